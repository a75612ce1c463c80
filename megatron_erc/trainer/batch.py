"""Typed training micro-batches, the global batch's split over data-parallel ranks, and the
global token count.

A sequence is ``prompt + response``; ``tokens`` / ``labels`` are its inputs and next-token
targets, ``loss_mask`` marks response tokens. Everything here is built on the host and moved
to the caller's ``device`` once per micro-batch, so a CUDA model never sees a CPU tensor.

The global batch (``plan_minibatches``): the kept prompt groups, in the order the whole job
agrees on, are cut into ``updates`` consecutive mini-batches; inside each, groups go to
data-parallel ranks balanced by token count. Every rank computes the same plan from the same
global data, so all ranks agree on every mini-batch's micro-batch count without a collective;
ranks with less data get zero-weight filler rows or micro-batches.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class MicroBatch:
    """One forward/backward micro-batch of ``b`` sequences of ``s`` tokens."""

    tokens: torch.Tensor
    """``[b, s]`` int64 input ids."""
    labels: torch.Tensor
    """``[b, s]`` int64 next-token ids."""
    loss_mask: torch.Tensor
    """``[b, s]`` float, 1 on tokens that enter the loss (response tokens), 0 on prompt,
    padding and filler rows."""
    advantages: torch.Tensor | None = None
    """``[b]`` GRPO advantage of each sequence (RL only)."""
    rewards: torch.Tensor | None = None
    """``[b]`` shaped reward of each sequence (RL only; positive-example NLL)."""
    rollout_logp: torch.Tensor | None = None
    """``[b, s]`` log-probs the engine sampled with (RL only; TIS, mismatch metrics)."""
    old_logp: torch.Tensor | None = None
    """``[b, s]`` log-probs before this rollout's updates (set by scoring or the first
    update's own forward)."""
    old_entropy: torch.Tensor | None = None
    """``[b, s]`` entropies before this rollout's updates (ERC's denominator)."""

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(**{f.name: None if (v := getattr(self, f.name)) is None
                             else v.to(device, non_blocking=True)
                             for f in dataclasses.fields(self)})

    def rows(self, index: slice) -> MicroBatch:
        return MicroBatch(**{f.name: None if (v := getattr(self, f.name)) is None else v[index]
                             for f in dataclasses.fields(self)})


@dataclasses.dataclass
class Sequence:
    """One (prompt, response) pair ready for packing."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]
    """Engine log-prob of each response token ``[len(response_ids)]``."""
    advantage: float
    reward: float

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def model_width(longest: int, seq_len: int) -> int:
    """Model length ``S`` for sequences of up to ``longest`` tokens: ``longest - 1`` rounded
    up to a multiple of 8 (sequence parallelism splits it over TP), capped at ``seq_len``."""
    return min(seq_len, -(-(max(longest, 2) - 1) // 8) * 8)


def pack(seqs: list[Sequence], rows: int, width: int, pad_id: int,
         device: torch.device | str) -> MicroBatch:
    """``seqs`` as one ``[rows, width]`` micro-batch on ``device``; rows beyond ``len(seqs)``
    are filler (pad tokens, zero loss mask). Sequences longer than ``width + 1`` tokens are
    cut (their tail gets no loss)."""
    if len(seqs) > rows:
        raise ValueError(f"{len(seqs)} sequences do not fit in {rows} rows")
    tokens = torch.full((rows, width + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, width + 1)
    rlogp = torch.zeros(rows, width + 1)
    adv, rew = torch.zeros(rows), torch.zeros(rows)
    for i, s in enumerate(seqs):
        ids = (s.prompt_ids + s.response_ids)[: width + 1]
        tokens[i, : len(ids)] = torch.tensor(ids)
        p, end = len(s.prompt_ids), min(len(s), width + 1)
        if end > p:
            mask[i, p:end] = 1.0
            rlogp[i, p:end] = torch.tensor(s.rollout_logp[: end - p], dtype=torch.float32)
        adv[i], rew[i] = s.advantage, s.reward
    return MicroBatch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                      loss_mask=mask[:, 1:].contiguous(), advantages=adv, rewards=rew,
                      rollout_logp=rlogp[:, 1:].contiguous()).to(device)


def plan_minibatches(group_tokens: list[int], updates: int, dp_size: int) -> list[list[list[int]]]:
    """``plan[m][r]``: indices of the groups data-parallel rank ``r`` trains on in mini-batch
    ``m``.

    ``group_tokens[g]``: token count of group ``g`` (all its sequences). Mini-batch ``m`` is
    the ``m``-th run of ``ceil(G / updates)`` consecutive groups (fewer mini-batches when
    ``G < updates``), the same for every DP size, so each update sees the same global data
    whatever the layout. Inside a mini-batch, ranks get ``floor`` or ``ceil`` of its groups
    / ``dp_size`` (balanced sequence counts) and, subject to that, the largest groups go
    first to the rank with the fewest tokens (balanced token counts).
    """
    if updates < 1 or dp_size < 1:
        raise ValueError(f"updates and dp_size must be >= 1, got {updates}, {dp_size}")
    per = -(-len(group_tokens) // updates) if group_tokens else 1
    plan = []
    for start in range(0, len(group_tokens), per):
        ids = list(range(start, min(start + per, len(group_tokens))))
        base, extra = divmod(len(ids), dp_size)
        capacity = [base + (r < extra) for r in range(dp_size)]
        load, ranks = [0] * dp_size, [[] for _ in range(dp_size)]
        for g in sorted(ids, key=lambda g: (-group_tokens[g], g)):
            r = min((r for r in range(dp_size) if len(ranks[r]) < capacity[r]),
                    key=lambda r: (load[r], r))
            ranks[r].append(g)
            load[r] += group_tokens[g]
        plan.append([sorted(r) for r in ranks])
    return plan


def split(batch: MicroBatch, size: int) -> list[MicroBatch]:
    """Consecutive slices of ``size`` sequences (the last may be shorter)."""
    n = batch.tokens.shape[0]
    return [batch.rows(slice(i, i + size)) for i in range(0, n, size)]


def global_token_count(micro_batches: list[MicroBatch], mask_of=lambda mb: mb.loss_mask,
                       dp_group=None) -> float:
    """Sum of ``mask_of(mb)`` over micro-batches and the data-parallel group (the token-mean
    denominator: the loss then depends neither on the micro-batch split nor on DP). The
    all-reduce runs on the micro-batches' device (NCCL reduces device tensors only)."""
    import torch.distributed as dist

    if not micro_batches:
        raise ValueError("global_token_count needs at least one micro-batch")
    n = sum(mask_of(mb).sum(dtype=torch.float64) for mb in micro_batches)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(n, group=dp_group)
    return max(float(n), 1.0)
