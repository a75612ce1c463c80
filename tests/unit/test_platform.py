"""The CPU platform layer: applied once, idempotent, effective, and never applied on CUDA.

The layer is process-wide by design, so each check runs in a fresh interpreter.
(That it is *needed* is shown in tests/distributed/test_megatron_parallel.py: TP=2 without it
fails, and the interleaved pipeline without the p2p setting computes wrong gradients.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
        from megatron_erc.platform import cpu_megatron
        try:
            cpu_megatron.apply()
        except cpu_megatron.CpuLayerError as e:
            assert "0.16.1" in str(e)
            print("ok")
    """)
    assert out.strip().endswith("ok")
