"""Online-softmax statistics of a vocabulary split into parts, and their combine.

A *part* is any subset of a token's vocabulary (a tile of columns, a kernel's vocabulary
split, a tensor-parallel rank's shard). With ``u = z / temperature`` its statistics are,
per token (all ``[T]``)::

    m = max_v u_v                    (-inf for an empty part)
    s = sum_v exp(u_v - m)           (0 for an empty part)
    a = sum_v exp(u_v - m) (u_v - m) (0 for an empty part)

Two parts merge exactly (the online-softmax rescaling, Milakov & Gimelshein 2018, extended
to the entropy sum): with ``M = max(m1, m2)`` and ``c_i = exp(m_i - M)``::

    s = c1 s1 + c2 s2
    a = c1 (a1 + (m1 - M) s1) + c2 (a2 + (m2 - M) s2)

and over the whole vocabulary ``log Z = M + log s``, ``H = log s - a / s``,
``log p(label) = u_label - M - log s``.

``combine_over_group`` merges the ranks' parts with two collectives over the group it is
given: all_reduce MAX of ``m`` ``[T]``, then one all_reduce SUM of the rescaled stacked
``[4, T]`` (``s``, ``a``, the label's raw logit and a hit flag). That is ``5 T`` floats per
rank; an all_gather of ``[4, T]`` would be one collective instead of two but moves
``4 T tp`` floats and needs the combine repeated on every rank; at these sizes (a few KiB)
either is latency-bound, and the all-reduce pair keeps the reduction order of every rank
identical. Nothing here reads Megatron's global parallel state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["merge_into", "combine_over_group", "rescale_to", "vocab_shard"]


def merge_into(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, m_t: torch.Tensor,
               s_t: torch.Tensor, a_t: torch.Tensor) -> None:
    """Merge the part ``(m_t, s_t, a_t)`` into ``(m, s, a)`` in place (all ``[T]``).

    Both parts must be non-empty (finite ``m``): this is the hot loop over tiles of real
    logits. Empty parts (all-padding shards) only meet in ``combine_over_group``. The tile's
    vectors are scratch: they are overwritten.
    """
    new_m = torch.maximum(m, m_t)
    d = m.sub_(new_m)  # m - M <= 0, reusing m's storage
    c = torch.exp(d)
    a.addcmul_(d, s).mul_(c)
    s.mul_(c)
    d_t = m_t.sub_(new_m)
    c_t = torch.exp(d_t)
    a.add_(a_t.addcmul_(d_t, s_t).mul_(c_t))
    s.add_(s_t.mul_(c_t))
    m.copy_(new_m)


def rescale_to(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, new_m: torch.Tensor,
               out: torch.Tensor) -> None:
    """Write ``s`` and ``a`` re-expressed relative to ``new_m >= m`` into ``out[0]``,
    ``out[1]``; an empty part (``s == 0``, ``m == -inf``) contributes exact zeros."""
    d = m - new_m
    c = torch.exp(d)  # 0 for an empty part
    torch.mul(s, c, out=out[0])
    # (a + d s) c: d = -inf and s = 0 would give nan, hence the where.
    term = a.addcmul(d.nan_to_num(neginf=0.0), s).mul_(c)
    torch.where(s > 0, term, torch.zeros_like(term), out=out[1])


def combine_over_group(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor,
                       target: torch.Tensor, hits: torch.Tensor, inv_temp: float,
                       group: dist.ProcessGroup | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every rank's part of the vocabulary: ``(logp, entropy, shift)``, all ``[T]``.

    Args:
        m, s, a: this rank's statistics ``[T]`` (see the module docstring); not modified.
        target: raw logit ``z`` of the label where this rank owns it, else 0 ``[T]``.
        hits: 1 where this rank owns the label, else 0 ``[T]`` (same dtype as ``s``).
        inv_temp: ``1 / temperature`` (``u = z * inv_temp``).
        group: the group the vocabulary is sharded over; ``None`` or size 1: no collective.

    Returns:
        ``logp`` (``-inf`` where no rank owns the label: padding ids, ignore indices),
        ``entropy``, and ``shift = M + log s`` so that ``log p_v = u_v - shift``.
    """
    distributed = group is not None and dist.get_world_size(group) > 1
    gmax = m.clone()
    if distributed:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    stats = torch.empty(4, m.shape[0], dtype=s.dtype, device=s.device)
    rescale_to(m, s, a, gmax, stats)
    stats[2].copy_(target)
    stats[3].copy_(hits)
    if distributed:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    sum_exp, sum_exp_u, tgt, hit = stats
    log_sum_exp = sum_exp.log()
    entropy = log_sum_exp - sum_exp_u / sum_exp
    logp = tgt.mul(inv_temp).sub_(gmax).sub_(log_sum_exp)
    logp.masked_fill_(hit == 0, float("-inf"))
    return logp, entropy, gmax.add_(log_sum_exp)


def vocab_shard(v_local: int, group: dist.ProcessGroup | None, vocab_start: int | None,
                vocab_size: int | None) -> tuple[int, int]:
    """``(vocab_start, n_valid)`` of this rank's ``v_local`` vocabulary rows/columns:
    defaults ``vocab_start = rank(group) * v_local`` and ``vocab_size = world * v_local``;
    ids ``>= vocab_size`` are padding, so only the first ``n_valid`` entries are real."""
    rank, world = (0, 1) if group is None else (dist.get_rank(group),
                                                  dist.get_world_size(group))
    if vocab_start is None:
        vocab_start = rank * v_local
    if vocab_size is None:
        vocab_size = world * v_local
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if vocab_size < 1 or vocab_size > world * v_local:
        raise ValueError(f"vocab_size must be in [1, tp_size * V_local = {world * v_local}] "
                         f"(pad the vocabulary to a multiple of tp_size), got {vocab_size}")
    return vocab_start, max(0, min(v_local, vocab_size - vocab_start))
