"""Core attention for megatron's local (non-Transformer-Engine) layer spec, used on CPU.

megatron's ``DotProductAttention`` materialises grouped-query K/V repeated to every query
head (``repeat_interleave``, whose backward is another reduction), builds a boolean causal
mask per call and copies the transposed keys for ``baddbmm``. ``CausalGroupedAttention``
computes the same function with the ``g = heads / kv_groups`` query heads of a group
stacked along the query axis, so each K/V group is read once by one batched matmul:

    q [sq, b, ng*g, hn] -> [b, ng, g*sq, hn];  scores = q @ k^T -> [b, ng, g*sq, sk]
    softmax(scores * scale + causal) in fp32 -> @ v [b, ng, sk, hn] -> [sq, b, ng*g*hn]

It handles the cases the trainer uses (causal self-attention, no explicit mask, no dropout,
bias, softmax offset or query-key layer scaling) and hands every other call to
``DotProductAttention``. Packed sequences (THD, ``PackedSeqParams.cu_seqlens_q``): megatron
passes ``[t, heads, hn]`` with the segments of one row concatenated; attention is causal
within each segment and blind across them (block-diagonal causal), computed segment by
segment so the cost is the sum of the squared lengths, not the square of their sum.
Tensor-parallel: heads are this rank's partition, nothing is reduced here.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class CausalGroupedAttention(DotProductAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mask: torch.Tensor | None = None

    def _fast_path_applies(self, query, key, attention_mask, attn_mask_type, attention_bias,
                           packed_seq_params) -> bool:
        dropout = self.attention_dropout.p if self.training else 0.0
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        packed_ok = packed_seq_params is None or (
            packed_seq_params.qkv_format == "thd"
            and packed_seq_params.cu_seqlens_q_padded is None
            and packed_seq_params.cu_seqlens_kv_padded is None
            and torch.equal(packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv))
        return (attention_mask is None and mask_type == AttnMaskType.causal
                and attention_bias is None and packed_ok and dropout == 0.0
                and self.softmax_offset is None and query.shape[0] == key.shape[0]
                and not self.config.apply_query_key_layer_scaling)

    def _causal(self, sq: int, device) -> torch.Tensor:
        """Additive fp32 causal mask ``[sq, sq]``: a view of one cached mask of the longest
        length seen (packed segments of every length share it)."""
        if self._mask is None or self._mask.shape[0] < sq or self._mask.device != device:
            self._mask = torch.full((sq, sq), float("-inf"), device=device).triu(1)
        return self._mask[:sq, :sq]

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` -> ``[sq, b, np*hn]``;
        packed: ``[t, np, hn]``, ``[t, ng, hn]`` -> ``[t, np*hn]``."""
        if not self._fast_path_applies(query, key, attention_mask, attn_mask_type,
                                       attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        if packed_seq_params is None:
            return self._causal_attention(query, key, value)
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        return torch.cat([
            self._causal_attention(query[a:e, None], key[a:e, None], value[a:e, None])[:, 0]
            for a, e in zip(bounds, bounds[1:], strict=False) if e > a])

    def _causal_attention(self, query, key, value):
        sq, b, heads, hn = query.shape
        groups = key.shape[2]
        g = heads // groups
        q = query.reshape(sq, b, groups, g, hn).permute(1, 2, 3, 0, 4)
        q = q.reshape(b, groups, g * sq, hn)
        scores = torch.matmul(q, key.permute(1, 2, 3, 0)).float()  # [b, ng, g*sq, sk]
        scores = scores.view(b, groups, g, sq, sq) * self.softmax_scale + self._causal(
            sq, scores.device)
        probs = scores.softmax(-1).view(b, groups, g * sq, sq)
        ctx = torch.matmul(probs.to(value.dtype), value.permute(1, 2, 0, 3))  # [b, ng, g*sq, hn]
        return ctx.view(b, groups, g, sq, hn).permute(3, 0, 1, 2, 4).reshape(sq, b, heads * hn)
