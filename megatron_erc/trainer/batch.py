"""Rollout samples -> padded training micro-batches, and the global token count.

A sequence is ``prompt + response``; ``tokens`` / ``labels`` are its inputs and next-token
targets, ``loss_mask`` marks response tokens. Per-sequence scalars (``advantages``,
``rewards``) and per-token tensors (``rollout_logp``, later ``old_logp``/``old_entropy``)
ride along, all ``[b, s]`` or ``[b]``.
"""

from __future__ import annotations

import torch


def pack_rollouts(prompt_ids: list[list[int]], responses: list[list[int]],
                  rollout_logps: list[list[float]], advantages: torch.Tensor,
                  rewards: torch.Tensor, pad_id: int, seq_len: int) -> dict:
    """One ``[N, S]`` batch from N (prompt, response) pairs, right-padded to the longest pair
    rounded up to a multiple of 8 (``S <= seq_len``: little compute goes to columns that are
    padding in every row)."""
    n = len(prompt_ids)
    longest = max(len(p) + len(r) for p, r in zip(prompt_ids, responses, strict=True))
    # model length S = width - 1, a multiple of 8 (sequence parallelism splits it over TP)
    width = min(seq_len, -(-(longest - 1) // 8) * 8) + 1
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width)
    rlogp = torch.zeros(n, width)
    for i, (p, r, lp) in enumerate(zip(prompt_ids, responses, rollout_logps, strict=True)):
        ids = (p + r)[:width]
        tokens[i, : len(ids)] = torch.tensor(ids)
        end = min(len(p) + len(r), width)
        mask[i, len(p): end] = 1.0
        rlogp[i, len(p): end] = torch.tensor(lp[: end - len(p)], dtype=torch.float32)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].contiguous(), "rollout_logp": rlogp[:, 1:].contiguous(),
            "advantages": advantages.float(), "rewards": rewards.float()}


def split(batch: dict, size: int) -> list[dict]:
    """Consecutive slices of ``size`` sequences (the last may be shorter)."""
    n = batch["tokens"].shape[0]
    return [{k: v[i: i + size] for k, v in batch.items()} for i in range(0, n, size)]


def global_token_count(micro_batches: list[dict], key: str = "loss_mask", dp_group=None) -> float:
    """Sum of ``key`` over micro-batches and the data-parallel group (token-mean denominator:
    the loss then does not depend on the micro-batch split or the DP size)."""
    import torch.distributed as dist

    n = torch.tensor(sum(float(mb[key].sum()) for mb in micro_batches), dtype=torch.float64)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(n, group=dp_group)
    return max(float(n), 1.0)
