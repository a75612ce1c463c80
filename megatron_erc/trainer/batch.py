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
import heapq

import torch
import torch.distributed as dist


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
    cu_seqlens: torch.Tensor | None = None
    """Packed (THD) micro-batch: ``[n + 1]`` int32 offsets of the ``n`` segments concatenated
    in its single row (``b == 1``; a trailing segment may be padding). Per-sequence fields
    (``advantages``, ``rewards``) are then per token ``[1, s]``. None: one sequence per row."""
    max_seqlen: int = 0
    """Longest segment of a packed micro-batch (RoPE table length)."""

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(**{f.name: v.to(device, non_blocking=True)
                             if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                             for f in dataclasses.fields(self)})

    def rows(self, index: slice) -> MicroBatch:
        if self.cu_seqlens is not None:
            raise ValueError("a packed micro-batch has one row; split sequences before packing")
        return MicroBatch(**{f.name: v[index] if isinstance(v := getattr(self, f.name),
                                                            torch.Tensor) else v
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


def round_up(n: int, multiple: int = 8) -> int:
    """``n`` (at least 1) rounded up to a multiple of ``multiple`` (sequence parallelism
    splits the model's sequence axis over TP)."""
    return -(-max(n, 1) // multiple) * multiple


def model_width(longest: int, seq_len: int) -> int:
    """Model length ``S`` for sequences of up to ``longest`` tokens: ``longest - 1`` rounded
    up to a multiple of 8, capped at ``seq_len``."""
    return min(seq_len, round_up(max(longest, 2) - 1))


def _columns(s: Sequence) -> tuple[list[int], list[int], list[float], list[float]]:
    """Inputs, labels, loss mask and engine log-probs of one sequence's ``len(s) - 1``
    model positions (position ``j`` predicts token ``j + 1``)."""
    ids = s.prompt_ids + s.response_ids
    context = max(len(s.prompt_ids) - 1, 0)  # positions whose label is a prompt token
    scored = len(ids) - 1 - context
    logp = [float(x) for x in s.rollout_logp[len(s.rollout_logp) - scored:]] if scored else []
    return ids[:-1], ids[1:], [0.0] * context + [1.0] * scored, [0.0] * context + logp


def pack(seqs: list[Sequence], rows: int, width: int, pad_id: int,
         device: torch.device | str) -> MicroBatch:
    """``seqs`` as one ``[rows, width]`` micro-batch on ``device``; rows beyond ``len(seqs)``
    are filler (pad tokens, zero loss mask). A sequence longer than ``width + 1`` tokens is an
    error: nothing is ever cut."""
    if len(seqs) > rows:
        raise ValueError(f"{len(seqs)} sequences do not fit in {rows} rows")
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), pad_id, dtype=torch.long)
    mask, rlogp = torch.zeros(rows, width), torch.zeros(rows, width)
    adv, rew = torch.zeros(rows), torch.zeros(rows)
    for i, s in enumerate(seqs):
        check_fits(s, width)
        cols = _columns(s)
        n = len(cols[0])
        for out, col in zip((tokens, labels, mask, rlogp), cols, strict=True):
            out[i, :n] = torch.tensor(col, dtype=out.dtype)
        adv[i], rew[i] = s.advantage, s.reward
    return MicroBatch(tokens=tokens, labels=labels, loss_mask=mask, advantages=adv,
                      rewards=rew, rollout_logp=rlogp).to(device)


def pack_thd(seqs: list[Sequence], length: int, pad_id: int,
             device: torch.device | str) -> MicroBatch:
    """``seqs`` concatenated into one ``[1, length]`` row (THD): segment ``i`` holds sequence
    ``i``'s ``len - 1`` model positions, a trailing padding segment fills the row. Advantages
    and rewards become per token. ``length`` must hold every position (never cut)."""
    cols: list[list] = [[], [], [], [], [], []]
    bounds = [0]
    for s in seqs:
        seq_cols = _columns(s)
        n = len(seq_cols[0])
        if n == 0:
            continue  # a one-token sequence predicts nothing
        for out, col in zip(cols, (*seq_cols, [s.advantage] * n, [s.reward] * n), strict=True):
            out.extend(col)
        bounds.append(bounds[-1] + n)
    if bounds[-1] > length:
        raise ValueError(f"{bounds[-1]} packed positions do not fit in a row of {length}")
    if bounds[-1] < length:  # padding: a segment of its own, attending only to itself
        bounds.append(length)
    pad = length - len(cols[0])
    dtypes = (torch.long, torch.long) + (torch.float32,) * 4
    tok, lab, mask, rlogp, adv, rew = (
        torch.tensor(c + [pad_id if dt == torch.long else 0.0] * pad, dtype=dt)[None]
        for c, dt in zip(cols, dtypes, strict=True))
    return MicroBatch(tokens=tok, labels=lab, loss_mask=mask, advantages=adv, rewards=rew,
                      rollout_logp=rlogp, cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                      max_seqlen=max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
                      ).to(device)


def check_fits(s: Sequence, width: int) -> None:
    if len(s) - 1 > width:
        raise ValueError(
            f"a sequence of {len(s)} tokens ({len(s.prompt_ids)} prompt + "
            f"{len(s.response_ids)} response) does not fit run.seq_len={width}: raise "
            "run.seq_len to data.max_prompt_tokens + rollout.max_response_tokens")


def micro_bins(lengths: list[list[int]], rows: int,
               max_tokens: int | None) -> list[list[list[int]]]:
    """``bins[r][k]``: indices (into ``lengths[r]``) of the sequences of data-parallel rank
    ``r``'s micro-batch ``k``; every rank gets the same number of micro-batches (some may be
    empty: zero-weight filler).

    Without a token budget, micro-batches are runs of ``rows`` consecutive sequences. With
    ``max_tokens``, the count starts at the most any rank needs by tokens alone and grows until
    every micro-batch of more than one sequence is within the budget; each rank's sequences are
    spread over that count longest first, each to the least-loaded micro-batch (balanced
    tokens). A sequence over the budget thus ends up alone. Pure function of the global batch:
    every rank computes the same bins.
    """
    if max_tokens is None:
        count = max([-(-len(lens) // rows) for lens in lengths] + [1])
        return [[list(range(k * rows, min((k + 1) * rows, len(lens)))) for k in range(count)]
                for lens in lengths]
    count = max([-(-sum(lens) // max_tokens) for lens in lengths] + [1])
    while True:
        bins = [_balanced(lens, count) for lens in lengths]
        if all(len(b) < 2 or sum(lens[i] for i in b) <= max_tokens
               for lens, rank_bins in zip(lengths, bins, strict=True) for b in rank_bins):
            return bins
        count += 1


def _balanced(lengths: list[int], count: int) -> list[list[int]]:
    """Longest-first assignment of ``lengths`` to the least-loaded of ``count`` bins."""
    heap = [(0, k) for k in range(count)]
    bins: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, k = heapq.heappop(heap)
        bins[k].append(i)
        heapq.heappush(heap, (load + lengths[i], k))
    return [sorted(b) for b in bins]


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

    if not micro_batches:
        raise ValueError("global_token_count needs at least one micro-batch")
    n = sum(mask_of(mb).sum(dtype=torch.float64) for mb in micro_batches)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(n, group=dp_group)
    return max(float(n), 1.0)
