"""Core attention for megatron's local (non-Transformer-Engine) layer spec, used on CPU.

megatron's ``DotProductAttention`` materialises grouped-query K/V repeated to every query
head (``repeat_interleave``, whose backward is another reduction), builds a boolean causal
mask per call and copies the transposed keys for ``baddbmm``. ``CausalGroupedAttention``
computes the same function with the ``g = heads / kv_groups`` query heads of a group
stacked along the query axis, so each K/V group is read once by one batched matmul:

    q [sq, b, ng*g, hn] -> [b, ng, g*sq, hn];  scores = q @ k^T -> [b, ng, g*sq, sk]
    softmax(scores * scale + causal) in fp32 -> @ v [b, ng, sk, hn] -> [sq, b, ng*g*hn]

It handles the case the trainer uses (causal self-attention, no explicit mask, no dropout,
bias, packed sequences, softmax offset or query-key layer scaling) and hands every other
call to ``DotProductAttention``. Tensor-parallel: heads are this rank's partition, nothing
is reduced here.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class CausalGroupedAttention(DotProductAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def _fast_path_applies(self, query, key, attention_mask, attn_mask_type, attention_bias,
                           packed_seq_params) -> bool:
        dropout = self.attention_dropout.p if self.training else 0.0
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return (attention_mask is None and mask_type == AttnMaskType.causal
                and attention_bias is None and packed_seq_params is None and dropout == 0.0
                and self.softmax_offset is None and query.shape[0] == key.shape[0]
                and not self.config.apply_query_key_layer_scaling)

    def _causal(self, sq: int, g: int, device) -> torch.Tensor:
        """Additive fp32 mask ``[g*sq, sq]``: the causal mask stacked ``g`` times."""
        mask = self._masks.get((sq, g))
        if mask is None:
            mask = torch.full((sq, sq), float("-inf"), device=device).triu(1).repeat(g, 1)
            self._masks = {(sq, g): mask}  # one length at a time: bounded memory
        return mask

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` -> ``[sq, b, np*hn]``."""
        if not self._fast_path_applies(query, key, attention_mask, attn_mask_type,
                                       attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        sq, b, heads, hn = query.shape
        groups = key.shape[2]
        g = heads // groups
        q = query.reshape(sq, b, groups, g, hn).permute(1, 2, 3, 0, 4)
        q = q.reshape(b, groups, g * sq, hn)
        scores = torch.matmul(q, key.permute(1, 2, 3, 0)).float()  # [b, ng, g*sq, sk]
        probs = (scores * self.softmax_scale + self._causal(sq, g, scores.device)).softmax(-1)
        ctx = torch.matmul(probs.to(value.dtype), value.permute(1, 2, 0, 3))  # [b, ng, g*sq, hn]
        return ctx.view(b, groups, g, sq, hn).permute(3, 0, 1, 2, 4).reshape(sq, b, heads * hn)
