"""The fused output layer (``ops.fused_linear``) run by Triton's interpreter on CPU equals the
float64 full-vocabulary reference built from ``hidden @ weight.T``: log-probs, entropy and
the gradients of the hidden states and the weight; odd sizes, vocabulary padding,
temperature, several vocabulary splits and backward chunks, bf16 inputs.

Shapes are tiny: the interpreter costs about a millisecond per program and op.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from megatron_erc.ops import fused_linear  # noqa: E402

# (tokens, hidden, padded vocab, true vocab): 43 real columns span two forward splits of
# 32 and three 16-column kernel blocks; hidden sizes not multiples of the 16-wide K block.
SHAPES = [(29, 23, 45, 43), (7, 16, 16, 16), (33, 9, 70, 37)]
# dtype: (value tol, grad rtol, grad atol relative to the largest reference gradient).
TOLS = {torch.float32: (1e-5, 1e-4, 1e-5), torch.bfloat16: (1e-5, 3e-2, 2e-2)}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Run the kernels in Triton's interpreter; the env var is read when kernels are
    decorated, hence the (re)import under it. Restored after each test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = importlib.import_module("megatron_erc.ops._fused_linear_triton")
    if not kernels.INTERPRET:
        importlib.reload(kernels)


def reference(hidden, weight, labels, vocab_size, temperature):
    """float64 ``(logp, entropy)`` from the materialised logits of the real vocabulary."""
    z = hidden.double() @ weight[:vocab_size].double().T / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, labels.clamp(0, vocab_size - 1).unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def _case(shape, dtype, seed):
    tokens, hidden_size, padded, _ = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(padded, hidden_size, generator=g) * 0.6).to(dtype)
    return hidden, weight, g


def check_against_reference(hidden, weight, labels, vocab_size, temperature, entropy_grad,
                            tols, w_logp, w_ent, where, **kwargs):
    """Run the fused op and compare values and both gradients with the reference.
    Returns the fused ``(logp, entropy, grad_hidden, grad_weight)``."""
    vtol, rtol, atol = tols
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, ent = fused_linear.fused_logprobs_and_entropy(
        h, w, labels, vocab_size=vocab_size, temperature=temperature,
        entropy_grad=entropy_grad, **kwargs)
    hr = hidden.double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    ref_logp, ref_ent = reference(hr, wr, labels, vocab_size, temperature)
    live = (labels >= 0) & (labels < vocab_size)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == labels.shape, where
    assert torch.isinf(logp[~live]).all() and (logp[~live] < 0).all(), where
    torch.testing.assert_close(logp[live].double(), ref_logp[live].detach(), rtol=vtol,
                               atol=vtol, msg=lambda m: f"logp {where}: {m}")
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=vtol, atol=vtol,
                               msg=lambda m: f"entropy {where}: {m}")
    if not entropy_grad:
        assert ent.grad_fn is None, where
    w_logp = torch.where(live, w_logp, 0.0)  # -inf entries carry no gradient weight
    loss = (w_logp * logp.masked_fill(~live, 0.0)).sum()
    ref_loss = (w_logp * torch.where(live, ref_logp, 0.0)).sum()
    if entropy_grad:
        loss = loss + (w_ent * ent).sum()
        ref_loss = ref_loss + (w_ent * ref_ent).sum()
    loss.backward()
    ref_loss.backward()
    for name, got, want in (("hidden", h.grad, hr.grad), ("weight", w.grad, wr.grad)):
        assert got.dtype == hidden.dtype and got.shape == want.shape, where
        torch.testing.assert_close(got.double(), want, rtol=rtol,
                                   atol=atol * float(want.abs().max()),
                                   msg=lambda m, n=name: f"grad {n} {where}: {m}")
    padding = w.grad[vocab_size:]
    assert torch.equal(padding, torch.zeros_like(padding)), f"padding rows {where}"
    return logp, ent, h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_index", range(len(SHAPES)))
@pytest.mark.parametrize("temperature,entropy_grad", [(1.0, False), (0.7, True)])
def test_matches_reference(dtype, shape_index, temperature, entropy_grad):
    shape = SHAPES[shape_index]
    hidden, weight, g = _case(shape, dtype, seed=shape_index)
    vocab_size = shape[3]
    labels = torch.randint(0, vocab_size, (shape[0],), generator=g)
    labels[0] = vocab_size  # a padding id ...
    labels[-1] = -100  # ... and an ignore index: zero probability
    w_logp = torch.randn(shape[0], generator=g, dtype=torch.float64)
    w_ent = torch.randn(shape[0], generator=g, dtype=torch.float64)
    # chunk_mb small enough for 16-column backward chunks (several per call).
    check_against_reference(hidden, weight, labels, vocab_size, temperature, entropy_grad,
                            TOLS[dtype], w_logp, w_ent, f"{shape} {dtype} T={temperature}",
                            chunk_mb=1e-4)


def test_batch_dims_and_one_backward_chunk():
    hidden, weight, g = _case((10, 20, 24, 24), torch.float32, seed=9)
    hidden = hidden.view(2, 5, 20)
    labels = torch.randint(0, 24, (2, 5), generator=g)
    check_against_reference(hidden.reshape(10, 20), weight, labels.reshape(10), 24, 1.3,
                            False, TOLS[torch.float32], torch.ones(10, dtype=torch.float64),
                            torch.zeros(10, dtype=torch.float64), "flat")
    logp, ent = fused_linear.fused_logprobs_and_entropy(hidden, weight, labels,
                                                        temperature=1.3)
    ref_logp, ref_ent = reference(hidden.reshape(10, 20), weight, labels.reshape(10), 24, 1.3)
    assert logp.shape == ent.shape == (2, 5)
    torch.testing.assert_close(logp.reshape(10).double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.reshape(10).double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_no_grad():
    hidden, weight, g = _case((6, 16, 16, 16), torch.float32, seed=4)
    labels = torch.randint(0, 16, (6,), generator=g)
    h = hidden.clone().requires_grad_(True)
    logp, _ = fused_linear.fused_logprobs_and_entropy(h, weight, labels)
    logp.sum().backward()
    assert h.grad is not None and weight.grad is None
    with torch.no_grad():
        logp, ent = fused_linear.fused_logprobs_and_entropy(h, weight, labels)
    assert logp.grad_fn is None and ent.grad_fn is None


def test_fused_available(monkeypatch):
    assert fused_linear.fused_available("cpu")  # under the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fused_linear.fused_available("cpu")
    assert not fused_linear.fused_available(None)
    hidden, weight, g = _case((4, 16, 16, 16), torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="Triton and CUDA"):
        fused_linear.fused_logprobs_and_entropy(hidden, weight, torch.zeros(4, dtype=int))


def test_input_validation():
    hidden, weight, _ = _case((4, 16, 16, 16), torch.float32, seed=1)
    labels = torch.zeros(4, dtype=torch.long)
    f = fused_linear.fused_logprobs_and_entropy
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :8], labels)
    with pytest.raises(TypeError, match="dtype"):
        f(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels shape"):
        f(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        f(hidden, weight, labels, vocab_size=17)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper(monkeypatch, tmp_path, dtype):
    """The interpreter does not compile: build both kernels for sm_90 (H100/H200) with the
    real compiler (frontend, MLIR passes, ptxas; no GPU needed) to catch what only it
    rejects. bf16 must lower to tensor-core MMAs."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    kernels = importlib.reload(importlib.import_module("megatron_erc.ops._fused_linear_triton"))
    flags = {"BT_": kernels.BT, "BV_": kernels.BV, "BH_": kernels.BH, "UPCAST_": False,
             "IEEE": dtype == "fp32"}
    types = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "dz_ptr": f"*{dtype}",
             "lab_ptr": "*i64", "out_ptr": "*fp32", "coef_ptr": "*fp32", "inv_temp": "fp32"}
    for kernel in (kernels._stats_kernel, kernels._dlogits_kernel):
        signature = {name: "constexpr" if name in flags else types.get(name, "i32")
                     for name in kernel.arg_names}
        compiled = compile(ASTSource(fn=kernel, signature=signature, constexprs=flags),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": kernels.NUM_WARPS})
        assert compiled.asm["cubin"], kernel.__name__
        if dtype == "bf16":
            assert "wgmma" in compiled.asm["ptx"], kernel.__name__
