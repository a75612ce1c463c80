"""The platform layer: the CPU layer is applied once, idempotent, effective, and never applied
on CUDA; its patches pass arguments through; the megatron-core release check; the
TransformerConfig fusions (off on CPU, megatron's defaults on CUDA).

The CPU layer is process-wide by design, so its checks run in a fresh interpreter (the
config checks only build configs and run in this one).
(That it is *needed* is shown in tests/distributed/test_megatron_parallel.py: TP=2 without it
fails, and the interleaved pipeline without the p2p setting computes wrong gradients.)
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from megatron_erc.platform import Platform


def run_py(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_apply_twice_changes_nothing_and_adapts_cuda_requests():
    out = run_py("""
        import torch
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer import torch_norm
        from megatron_erc import platform
        from megatron_erc.platform import cpu_megatron

        assert not cpu_megatron.is_applied()
        depth0 = torch._C._len_torch_function_stack()
        p = platform.setup()
        assert p.is_cpu and p.backend == "gloo" and cpu_megatron.is_applied()
        snap = lambda: (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed,
                        mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state,
                        torch_norm.WrappedTorchNorm.__new__, torch._C._len_torch_function_stack())
        first = snap()
        assert first[-1] == depth0 + 1, "exactly one torch function mode is pushed"
        platform.setup(); cpu_megatron.apply()
        assert snap() == first, "a second application changed the patched state"

        x = torch.ones(3)
        assert torch.empty(2, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert x.cuda() is x and x.pin_memory() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor" and not x.is_cuda
        assert torch.empty(2, pin_memory=True).device.type == "cpu"
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_rng_tracker_forks_cpu_generator_and_restores_it():
    out = run_py("""
        import torch
        from megatron.core import tensor_parallel
        from megatron_erc import platform
        from megatron_erc.platform.distributed import init_process_group

        init_process_group(platform.setup())  # single rank, no launcher
        torch.manual_seed(0)
        platform.init_model_parallel(1, 1, seed=123)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        with tracker.fork():
            b = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the default state"
        assert not torch.equal(a, b), "the tracked state must advance between forks"
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_never_applied_on_cuda_and_switch_read_once():
    out = run_py("""
        import torch
        torch.cuda.is_available = lambda: True   # what a CUDA machine reports
        original = torch.cuda.current_device
        from megatron_erc import platform
        from megatron_erc.platform import cpu_megatron

        p = platform.setup()
        assert (p.device_type, p.backend) == ("cuda", "nccl"), p
        assert not cpu_megatron.is_applied()
        assert torch.cuda.current_device is original
        assert torch._C._len_torch_function_stack() == 0
        try:
            cpu_megatron.apply()
        except cpu_megatron.CpuLayerError:
            pass
        else:
            raise AssertionError("apply() must refuse on a CUDA machine")
        torch.cuda.is_available = lambda: False  # read once at start-up: later answers ignored
        assert platform.detect() is p and platform.setup() is p
        assert not cpu_megatron.is_applied()
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_unsupported_megatron_version_fails_loudly():
    out = run_py("""
        import megatron.core
        megatron.core.__version__ = "0.99.0"
        from megatron_erc.platform import UnsupportedMegatronError, cpu_megatron
        try:
            cpu_megatron.apply()
        except UnsupportedMegatronError as e:
            assert "0.99.0" in str(e) and "0.16.1" in str(e) and "CPU platform layer" in str(e)
            assert not cpu_megatron.is_applied()
            print("ok")
    """)
    assert out.strip().endswith("ok")


def test_patches_pass_arguments_through():
    """The patched megatron functions accept any arguments megatron passes (positional,
    keyword, or ones a later release adds) instead of a re-typed copy of its signature."""
    out = run_py("""
        import torch
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer import TransformerConfig, torch_norm
        from megatron_erc import platform
        from megatron_erc.platform import cpu_megatron

        platform.setup()
        state = mrandom._get_cuda_rng_state("cuda", True, graph_safe=False, future_arg=1)
        a = torch.rand(3)
        mrandom._set_cuda_rng_state(state, -1, graph_safe=False, future_arg=1)
        mrandom._set_cuda_rng_state(new_state=state)
        assert torch.equal(torch.rand(3), a)
        assert torch.cuda.manual_seed(5) is not None

        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                                   normalization="RMSNorm", tensor_model_parallel_size=2,
                                   sequence_parallel=True)
        norms = [torch_norm.WrappedTorchNorm(config, 8, 1e-6),
                 torch_norm.WrappedTorchNorm(config=config, hidden_size=8, eps=1e-6)]
        for norm in norms:
            assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
            assert all(p.sequence_parallel for p in norm.parameters())
        assert config.sequence_parallel

        try:
            cpu_megatron._require_params(lambda cfg, hidden_size: None, "config")
        except cpu_megatron.CpuLayerError as e:
            assert "config" in str(e) and "0.16.1" in str(e)
            print("ok")
    """)
    assert out.strip().endswith("ok")


def test_require_supported_megatron_on_every_platform(monkeypatch):
    from megatron_erc import platform
    from megatron_erc.platform import version

    monkeypatch.setattr(version, "installed_megatron_version", lambda: "0.17.0")
    with pytest.raises(platform.UnsupportedMegatronError) as err:
        platform.require_supported_megatron("the actor's optimizer step")
    message = str(err.value)
    assert "0.17.0" in message and "0.16.x" in message and "megatron-core==0.16.1" in message
    assert "the actor's optimizer step" in message
    monkeypatch.setattr(version, "installed_megatron_version", lambda: "0.16.3")
    assert platform.require_supported_megatron() == "0.16.3"


# --- TransformerConfig fusions: CPU choices in the CPU layer, megatron's defaults on CUDA --

CUDA = Platform(device_type="cuda", backend="nccl")
CPU = Platform(device_type="cpu", backend="gloo")


def _tiny_config(platform, **overrides):
    from transformers import AutoConfig

    from megatron_erc.models import ParallelConfig, transformer_config_from_hf

    d = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())
    d.pop("architectures"), d.pop("torch_dtype")
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    return transformer_config_from_hf(hf, ParallelConfig(), platform=platform, **overrides)


def test_fusions_at_megatron_defaults_on_cuda_and_off_on_cpu():
    from megatron_erc.platform.transformer_config import CPU_FUSIONS_OFF, megatron_default

    cuda, cpu = _tiny_config(CUDA), _tiny_config(CPU)
    for name in CPU_FUSIONS_OFF:
        assert getattr(cuda, name) == megatron_default(name), name
        assert getattr(cpu, name) is False, name
    assert cpu.use_cpu_initialization and not cuda.use_cpu_initialization
    # On CPU a fusion cannot be asked back in; CUDA keeps what is asked for.
    forced = _tiny_config(CPU, bias_activation_fusion=True, bias_dropout_fusion=True)
    assert not forced.bias_activation_fusion and not forced.bias_dropout_fusion
    asked = _tiny_config(CUDA, bias_activation_fusion=True, bias_dropout_fusion=True)
    assert asked.bias_activation_fusion and asked.bias_dropout_fusion


def test_gradient_accumulation_fusion_on_cuda_needs_apex_extension(tmp_path, monkeypatch):
    from megatron_erc.platform import adapt_transformer_kwargs

    asked = {"gradient_accumulation_fusion": True}
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:  # apex absent
        assert adapt_transformer_kwargs(asked, CUDA)["gradient_accumulation_fusion"] is False
    # With apex's extension importable the request stands.
    (tmp_path / "fused_weight_gradient_mlp_cuda.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert adapt_transformer_kwargs(asked, CUDA)["gradient_accumulation_fusion"] is True
    assert adapt_transformer_kwargs(asked, CPU)["gradient_accumulation_fusion"] is False
