"""The one-pass tiling of ``logprobs_and_entropy``: with CPU tiles shrunk to a few elements
every row crosses several vocabulary tiles, so the online-softmax merge (running max,
rescaled sums) and the tile-wise backward carry the whole result; it must still equal the
float64 full-vocabulary reference, values and gradients. Plus the statistics merge itself.
"""

from __future__ import annotations

import pytest
import torch

from megatron_erc.ops import softmax_stats
from megatron_erc.ops import vocab_parallel as vp


def _reference(logits, labels, temperature, vocab_size):
    logp_all = torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles of at most 3 rows x 7 columns."""
    monkeypatch.setattr(vp, "_CPU_TILE_ELEMS", 21)
    monkeypatch.setattr(vp, "_CPU_TILE_COLS", 7)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-4, 1e-5),
                                             (torch.bfloat16, 1e-2, 2e-3)])
@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("temperature,chunk", [(1.0, None), (0.7, 2), (1.6, 5)])
def test_tiled_matches_reference(tiny_tiles, dtype, rtol, atol, entropy_grad, temperature,
                                 chunk):
    vocab_size, padded = 31, 33  # 5 column tiles, the last one ragged, two padding ids
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(4, 5, padded, generator=g) * 4).to(dtype)
    logits[..., vocab_size:] = 1e4  # would dominate any softmax it leaked into
    labels = torch.randint(0, vocab_size, (4, 5), generator=g)
    labels[0, 0] = vocab_size  # a padding id: zero probability
    w_logp = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w_ent = torch.randn(4, 5, generator=g, dtype=torch.float64)

    x = logits.clone().requires_grad_(True)
    logp, ent = vp.logprobs_and_entropy(x, labels, vocab_size=vocab_size,
                                        temperature=temperature, chunk_size=chunk,
                                        entropy_grad=entropy_grad)
    assert logp[0, 0] == -float("inf")
    live = torch.ones_like(labels, dtype=torch.bool)
    live[0, 0] = False
    xr = logits.double().requires_grad_(True)
    ref_logp, ref_ent = _reference(xr, labels.clamp(max=vocab_size - 1), temperature,
                                   vocab_size)
    torch.testing.assert_close(logp[live].double(), ref_logp[live].detach(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)

    w_logp[0, 0] = 0.0  # the -inf entry gets no gradient weight
    loss = (w_logp * logp.masked_fill(~live, 0.0)).sum()
    ref_loss = (w_logp * ref_logp).sum()
    if entropy_grad:
        loss = loss + (w_ent * ent).sum()
        ref_loss = ref_loss + (w_ent * ref_ent).sum()
    loss.backward()
    ref_loss.backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=rtol, atol=atol)
    assert torch.equal(x.grad[..., vocab_size:], torch.zeros_like(x.grad[..., vocab_size:]))


def test_tiled_gradcheck(tiny_tiles):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 17, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, 17, (5,), generator=g)

    def fn(z):
        return vp.logprobs_and_entropy(z, labels, temperature=0.8, chunk_size=2,
                                       entropy_grad=True)

    assert torch.autograd.gradcheck(fn, (logits,))


def test_tile_shape_respects_chunk_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert vp._tile_shape(cpu, 4096, 16384, 512) == (8, 16384)
    assert vp._tile_shape(cpu, 4096, 76000, 512) == (4, 32768)
    assert vp._tile_shape(cpu, 4096, 16384, 3) == (3, 16384)
    assert vp._tile_shape(cuda, 4096, 16384, 512) == (512, 16384)
    assert vp._tile_shape(cuda, 100, 0, 512) == (100, 1)


def test_merge_and_combine_with_empty_part():
    """Splitting a row's vocabulary into parts (one empty) and merging gives the whole."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 12, generator=g, dtype=torch.float64) * 5

    def stats(part):
        if part.shape[-1] == 0:
            return (torch.full((3,), float("-inf"), dtype=torch.float64),
                    torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
        m = part.amax(-1)
        e = torch.exp(part - m[:, None])
        return m, e.sum(-1), (e * (part - m[:, None])).sum(-1)

    m, s, a = stats(u[:, :5])
    merge_parts = stats(u[:, 5:])
    softmax_stats.merge_into(m, s, a, *merge_parts)
    # An empty part (an all-padding shard) is rescaled to exact zeros, never nan.
    out = torch.empty(2, 3, dtype=torch.float64)
    softmax_stats.rescale_to(*stats(u[:, :0]), m, out)
    assert torch.equal(out, torch.zeros_like(out))
    labels = torch.tensor([0, 7, 11])
    target = u.gather(-1, labels[:, None])[:, 0]
    logp, ent, shift = softmax_stats.combine_over_group(
        m, s, a, target, torch.ones(3, dtype=torch.float64), 1.0, None)
    ref = torch.log_softmax(u, -1)
    torch.testing.assert_close(logp, ref.gather(-1, labels[:, None])[:, 0])
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
    torch.testing.assert_close(shift, torch.logsumexp(u, -1))
