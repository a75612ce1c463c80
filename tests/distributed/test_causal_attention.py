"""``CausalGroupedAttention`` against megatron's own ``DotProductAttention`` (same inputs,
float32, values and input gradients), with grouped-query and plain multi-head layouts; packed
(THD) segments against each segment alone; and the calls it must hand back to megatron (an
explicit mask)."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.harness import run_distributed, run_each

# Every case runs in one world of 1 (harness.run_each), started once on one xdist worker.
pytestmark = pytest.mark.xdist_group("causal_attention")
CASES = [(4, 2, "float32"), (4, 4, "float32"), (6, 1, "float32"), (4, 2, "bfloat16")]


@functools.cache
def results() -> dict:
    calls = [("tests.distributed.test_causal_attention:compare", c) for c in CASES]
    return dict(zip(CASES, run_distributed(run_each, 1, calls, timeout=900)[0], strict=True))


def compare(rank: int, world: int, heads: int, groups: int, dtype: str):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_erc import platform
    from megatron_erc.models.causal_attention import CausalGroupedAttention

    platform.setup()
    platform.init_model_parallel(1, 1, seed=0)
    dt = getattr(torch, dtype)
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * 16, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=16, attention_dropout=0.0,
                            masked_softmax_fusion=False, params_dtype=dt,
                            bf16=dt == torch.bfloat16)
    args = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    ours, ref = CausalGroupedAttention(**args), DotProductAttention(**args)
    g = torch.Generator().manual_seed(0)
    sq, b = 13, 3
    inputs = [torch.randn(sq, b, n, 16, generator=g).to(dt)
              for n in (heads, groups, groups)]
    upstream = torch.randn(sq, b, heads * 16, generator=g).to(dt)
    out = {}
    for name, module, mask in (("ours", ours, None), ("ref", ref, None),
                               ("ours_masked", ours, "pad"), ("ref_masked", ref, "pad")):
        x = [t.clone().requires_grad_() for t in inputs]
        m = None
        if mask:  # an explicit mask (True = masked): causal plus the first key hidden
            m = torch.ones(sq, sq, dtype=torch.bool).triu(1)
            m[:, 0] = True
            m[0, 0] = False
            m = m[None, None].expand(b, 1, sq, sq)
        y = module(*x, attention_mask=m)
        (y.float() * upstream.float()).sum().backward()
        out[name] = [y.detach().float()] + [t.grad.float() for t in x]
    # packed (THD): three segments of the first batch row in one [t, heads, hn] tensor, against
    # megatron on each segment alone
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, 5, 6, sq], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7,
                          max_seqlen_kv=7)
    x = [t[:, 0].clone().requires_grad_() for t in inputs]
    y = ours(*x, attention_mask=None, packed_seq_params=psp)
    (y.float() * upstream[:, 0].float()).sum().backward()
    out["packed"] = [y.detach().float()] + [t.grad.float() for t in x]
    ref_parts = []
    for a, e in ((0, 5), (5, 6), (6, sq)):
        x = [t[a:e, :1].clone().requires_grad_() for t in inputs]
        y = ref(*x, attention_mask=None)
        (y.float() * upstream[a:e, :1].float()).sum().backward()
        ref_parts.append([y.detach().float()[:, 0]] + [t.grad.float()[:, 0] for t in x])
    out["packed_ref"] = [torch.cat(parts) for parts in zip(*ref_parts, strict=True)]
    return out


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (6, 1)])
def test_matches_megatron_dot_product_attention(heads, groups):
    r = results()[(heads, groups, "float32")]
    for got, want, what in zip(r["ours"], r["ref"], ("out", "dq", "dk", "dv"), strict=True):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-6, (what, err)
    # an explicit mask goes to megatron's implementation: identical results
    for got, want in zip(r["ours_masked"], r["ref_masked"], strict=True):
        assert torch.equal(got, want)
    assert not torch.allclose(r["ours_masked"][0], r["ours"][0]), "the mask must matter"
    # packed rows: block-diagonal causal, equal to each sequence alone
    for got, want, what in zip(r["packed"], r["packed_ref"], ("out", "dq", "dk", "dv"),
                               strict=True):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-6, ("packed", what, err)
    assert not torch.allclose(r["packed"][0], r["ours"][0][:, 0]), "segments must not attend across"


def test_bf16_matches_megatron_within_bf16_rounding():
    r = results()[(4, 2, "bfloat16")]
    for got, want, what in zip(r["ours"], r["ref"], ("out", "dq", "dk", "dv"), strict=True):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 2e-2, (what, err)
