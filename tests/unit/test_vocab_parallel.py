"""Single-process tests of ``megatron_erc.ops.logprobs_and_entropy`` (``tp_group=None``)
against an independent full-vocabulary float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_erc.ops import logprobs_and_entropy


def reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
              vocab_size: int | None = None):
    """float64 log-softmax over the true vocabulary (padding columns dropped)."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    logp_all = torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _case(shape=(3, 7), vocab=50, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
def test_values_match_reference(dtype, temperature, chunk_size):
    logits, labels = _case(dtype=dtype)
    logp, ent = logprobs_and_entropy(logits, labels, temperature=temperature,
                                     chunk_size=chunk_size)
    ref_logp, ref_ent = reference(logits, labels, temperature)
    assert logp.dtype == ent.dtype == torch.float32
    assert logp.shape == ent.shape == labels.shape
    # bf16 input is exact once rounded; accumulation is fp32 either way.
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_reference_is_not_trivially_matched():
    # The comparison above can fail: a wrong temperature is caught.
    logits, labels = _case()
    logp, ent = logprobs_and_entropy(logits, labels, temperature=1.1)
    ref_logp, ref_ent = reference(logits, labels, 1.0)
    assert not torch.allclose(logp.double(), ref_logp, atol=1e-3)
    assert not torch.allclose(ent.double(), ref_ent, atol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck_logp(temperature, chunk_size):
    logits, labels = _case(shape=(2, 3), vocab=7, dtype=torch.float64, scale=1.0)
    logits.requires_grad_(True)
    fn = lambda z: logprobs_and_entropy(z, labels, temperature=temperature,
                                        chunk_size=chunk_size)[0]
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradcheck_entropy_grad(temperature, chunk_size):
    logits, labels = _case(shape=(5,), vocab=9, dtype=torch.float64, scale=1.0, seed=3)
    logits.requires_grad_(True)
    fn = lambda z: logprobs_and_entropy(z, labels, temperature=temperature,
                                        chunk_size=chunk_size, entropy_grad=True)
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-4, 1e-5),
                                             (torch.bfloat16, 1e-2, 2e-3)])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_gradients_match_reference_autograd(dtype, rtol, atol, chunk_size, entropy_grad):
    logits, labels = _case(shape=(4, 6), vocab=300, dtype=dtype, seed=1)
    w_logp = torch.randn(labels.shape, dtype=torch.float64)
    w_ent = torch.randn(labels.shape, dtype=torch.float64)
    temperature = 0.8

    x = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(x, labels, temperature=temperature,
                                     chunk_size=chunk_size, entropy_grad=entropy_grad)
    loss = (w_logp * logp).sum() + ((w_ent * ent).sum() if entropy_grad else 0.0)
    loss.backward()

    xr = logits.double().requires_grad_(True)
    ref_logp, ref_ent = reference(xr, labels, temperature)
    ref_loss = (w_logp * ref_logp).sum() + ((w_ent * ref_ent).sum() if entropy_grad else 0.0)
    ref_loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=rtol, atol=atol)


def test_padding_ids_get_zero_probability():
    vocab_size = 37
    logits, labels = _case(vocab=40, seed=2)
    labels = labels.clamp(max=vocab_size - 1)
    ref_logp, ref_ent = reference(logits, labels, 0.9, vocab_size)
    for fill in (0.0, 1e4, -1e4):
        padded = logits.clone()
        padded[..., vocab_size:] = fill
        x = padded.requires_grad_(True)
        logp, ent = logprobs_and_entropy(x, labels, vocab_size=vocab_size, temperature=0.9,
                                         chunk_size=4)
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
        logp.sum().backward()
        assert torch.equal(x.grad[..., vocab_size:], torch.zeros_like(x.grad[..., vocab_size:]))


def test_out_of_range_label_has_zero_probability():
    logits, labels = _case(shape=(4,), vocab=12)
    labels.clamp_(max=10)
    labels[1] = 11  # padding id (vocab_size=11)
    labels[2] = -100  # an ignore index
    logp, _ = logprobs_and_entropy(logits, labels, vocab_size=11)
    assert logp[1] == -float("inf") and logp[2] == -float("inf")
    assert torch.isfinite(logp[[0, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_not_modified_in_place(dtype):
    logits, labels = _case(dtype=dtype)
    x = logits.clone().requires_grad_(True)
    version = x._version
    logp, ent = logprobs_and_entropy(x, labels, temperature=0.5, chunk_size=3,
                                     entropy_grad=True)
    (logp.sum() + ent.sum()).backward()
    assert x._version == version
    assert torch.equal(x.detach(), logits)


def test_entropy_has_no_graph_by_default():
    logits, labels = _case()
    x = logits.requires_grad_(True)
    logp, ent = logprobs_and_entropy(x, labels)
    assert logp.grad_fn is not None and logp.requires_grad
    assert ent.grad_fn is None and not ent.requires_grad
    _, ent2 = logprobs_and_entropy(x, labels, entropy_grad=True)
    assert ent2.grad_fn is not None
    with torch.no_grad():
        logp3, ent3 = logprobs_and_entropy(x, labels, chunk_size=2)
    assert logp3.grad_fn is None and ent3.grad_fn is None


def test_reads_no_global_parallel_state(monkeypatch):
    from megatron.core import parallel_state

    def boom(*_a, **_k):
        raise AssertionError("megatron global parallel state was read")

    for name in dir(parallel_state):
        if name.startswith(("get_", "is_", "model_parallel_is_initialized")):
            monkeypatch.setattr(parallel_state, name, boom)
    logits, labels = _case()
    x = logits.requires_grad_(True)
    logp, ent = logprobs_and_entropy(x, labels, chunk_size=2, entropy_grad=True)
    (logp.sum() + ent.sum()).backward()


def test_input_validation():
    logits, labels = _case()
    with pytest.raises(ValueError, match="labels shape"):
        logprobs_and_entropy(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, labels, temperature=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_and_entropy(logits, labels, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_and_entropy(logits, labels, chunk_size=-3)
    with pytest.raises(TypeError, match="integer token ids"):
        logprobs_and_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="vocab_size"):
        logprobs_and_entropy(logits, labels, vocab_size=logits.shape[-1] + 1)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 9), vocab=st.integers(1, 40),
       temperature=st.floats(0.2, 3.0), chunk=st.one_of(st.none(), st.integers(1, 10)),
       scale=st.floats(0.0, 20.0), seed=st.integers(0, 2**16))
def test_property_matches_reference(tokens, vocab, temperature, chunk, scale, seed):
    logits, labels = _case(shape=(tokens,), vocab=vocab, seed=seed, scale=scale)
    logp, ent = logprobs_and_entropy(logits, labels, temperature=temperature, chunk_size=chunk)
    ref_logp, ref_ent = reference(logits, labels, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-4)
