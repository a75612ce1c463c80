"""The training stages of one RL step, called by ``rl.train`` in order.

``micro_batches_for_rank``: this data-parallel rank's share of the global batch, as
micro-batches per mini-batch. ``score_old_logprobs``: one no-grad pass through the pipeline
schedule for ``old_logp`` / ``old_entropy`` ``[b, s]``. ``update``: one mini-batch of
policy-loss forward/backward and an optimizer step. ``sync_engine``: weights -> engine.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.distributed as dist

from megatron_erc.algorithms import (
    NON_ADDITIVE_METRICS,
    policy_loss,
    positive_nll,
    positive_token_mask,
)
from megatron_erc.models.hf_adapter import HFLayout
from megatron_erc.rollout import sync_weights
from megatron_erc.trainer.batch import (
    MicroBatch,
    Sequence,
    check_fits,
    global_token_count,
    micro_bins,
    model_width,
    pack,
    pack_thd,
    plan_minibatches,
    round_up,
)


def micro_batches_for_rank(groups: list[list[Sequence]], *, updates: int, dp_size: int,
                           dp_rank: int, micro_batch_size: int, seq_len: int, pad_id: int,
                           device, fixed_shape: bool = False, max_tokens: int | None = None,
                           packed: bool = False) -> list[list[MicroBatch]]:
    """``[mini][micro]`` micro-batches of ``dp_rank`` for the global ``groups``.

    Every DP rank gets the same number of mini-batches and, per mini-batch, the same number of
    micro-batches (``batch.micro_bins``: ``micro_batch_size`` sequences each, or a
    ``max_tokens`` budget); a micro-batch a rank has no sequences for is zero-weight filler.
    Unpacked, each micro-batch is as wide as its longest sequence (rounded up to 8); packed,
    its sequences share one row as long as their sum (rounded up to 8). ``fixed_shape``
    (pipeline parallelism: stages exchange activations of one shape) gives every micro-batch
    of the rank the shape of its largest: ``[micro_batch_size or most sequences, widest]``
    unpacked, ``[1, longest row]`` packed.
    """
    plan = plan_minibatches([sum(len(s) for s in g) for g in groups], updates, dp_size)
    shares = [[[s for g in ids for s in groups[g]] for ids in mini] for mini in plan]
    mine = []
    for ranks in shares:
        for s in ranks[dp_rank]:
            check_fits(s, seq_len)
        bins = micro_bins([[len(s) - 1 for s in seqs] for seqs in ranks], micro_batch_size,
                          max_tokens)[dp_rank]
        mine.append([[ranks[dp_rank][i] for i in b] for b in bins])
    micro = [seqs for mini in mine for seqs in mini]
    if packed:
        size = lambda seqs: round_up(sum(len(s) - 1 for s in seqs))  # noqa: E731
        longest = max(size(seqs) for seqs in micro)
        return [[pack_thd(seqs, longest if fixed_shape else size(seqs), pad_id, device)
                 for seqs in mini] for mini in mine]
    width = lambda seqs: model_width(max((len(s) for s in seqs), default=2), seq_len)  # noqa: E731
    widest = max(width(seqs) for seqs in micro)
    rows = max([micro_batch_size if max_tokens is None else 1] + [len(m) for m in micro])
    return [[pack(seqs, rows if fixed_shape else max(len(seqs), 1),
                  widest if fixed_shape else width(seqs), pad_id, device)
             for seqs in mini] for mini in mine]


def score_old_logprobs(actor, micro_batches: list[MicroBatch], chunk_mb: int = 64) -> None:
    """Sets ``old_logp`` and ``old_entropy`` ``[b, s]`` of each micro-batch (last PP stage).

    ``rl.train`` calls it for the off-policy mini-batches only: a micro-batch without
    ``old_logp`` gets the detached log-probs of its own update forward (``policy_loss_fn``),
    which are the same numbers, since no optimizer step has happened in between.
    """

    def loss_fn(logits, mb):
        mb.old_logp, mb.old_entropy = actor.logprobs(logits.detach(), mb.labels,
                                                     chunk_mb=chunk_mb)
        return mb.old_logp.new_zeros(()), {}

    with actor.moe.scoring() if actor.moe else contextlib.nullcontext():  # record experts
        actor.forward_backward(micro_batches, loss_fn, forward_only=True)


def policy_loss_fn(cfg, actor, mini: list[MicroBatch]):
    """The per-micro-batch loss of one mini-batch: token-mean over its global response
    tokens (all micro-batches, all DP ranks), so neither the split nor DP changes it."""
    dp = actor.dp_group
    num_tokens = global_token_count(mini, dp_group=dp)
    positive = {id(mb): positive_token_mask(mb.loss_mask, mb.rewards) for mb in mini}
    pos_tokens = global_token_count(mini, lambda mb: positive[id(mb)], dp_group=dp)
    algo = cfg.algo
    extra = {}
    if algo.regularizer != "none":  # the covariance's mean advantage over the mini-batch
        adv_sum = sum((mb.loss_mask * _per_token(mb.advantages, mb.loss_mask)).sum(
            dtype=torch.float64) for mb in mini)
        if dp is not None and dist.get_world_size(dp) > 1:
            dist.all_reduce(adv_sum, group=dp)
        extra["adv_mean"] = float(adv_sum) / num_tokens
    # Clip-Cov's random pick: the same on every TP / PP rank of this micro-batch, different
    # per optimizer step, DP rank and micro-batch, and reproduced on resume (the scheduler's
    # step count is checkpointed)
    seed_base = (cfg.run.seed, actor.lr_scheduler.num_steps, actor.dp_rank)
    index = {id(mb): i for i, mb in enumerate(mini)}

    def loss_fn(logits, mb):
        logp, ent = actor.logprobs(logits, mb.labels, chunk_mb=algo.logprob_chunk_mb,
                                   **({"entropy_grad": True} if algo.entropy_coef else {}))
        if mb.old_logp is None:  # first mini-batch: no update yet, so the current policy is
            mb.old_logp, mb.old_entropy = logp.detach(), ent.detach()  # the old one
        loss, m = policy_loss(
            logp, mb.old_logp, mb.advantages, mb.loss_mask, cfg=algo, entropy=ent,
            old_entropy=mb.old_entropy, rollout_logp=mb.rollout_logp if algo.tis_cap else None,
            num_tokens=num_tokens, segment_ids=segment_ids(mb),
            seed=_seed(*seed_base, index[id(mb)]), **extra)
        if algo.pos_nll_coef:
            loss = loss + algo.pos_nll_coef * positive_nll(
                logp, mb.loss_mask, mb.rewards, num_tokens=pos_tokens)
        return loss, {**m, "loss": loss.detach()}

    return loss_fn


def segment_ids(mb: MicroBatch) -> torch.Tensor | None:
    """``[1, s]`` index of the packed sequence each position belongs to (GSPO's sequence
    ratio); None for one sequence per row."""
    if mb.cu_seqlens is None:
        return None
    s = mb.tokens.shape[-1]
    positions = torch.arange(s, device=mb.cu_seqlens.device)
    return (torch.searchsorted(mb.cu_seqlens[1:].long(), positions, right=True))[None]


def _per_token(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if x.shape == like.shape else x.unsqueeze(-1).expand_as(like)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (``hash`` of a str is not)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def update(cfg, actor, mini: list[MicroBatch]) -> dict:
    """One optimizer step on a mini-batch."""
    loss_fn = policy_loss_fn(cfg, actor, mini)
    scored = any(mb.old_logp is not None for mb in mini)  # off-policy: replay its experts
    with actor.moe.updating(scored) if actor.moe else contextlib.nullcontext():
        per_micro = actor.forward_backward(mini, loss_fn)
    applied, grad_norm = actor.step()
    out = {"grad_norm": grad_norm, "skipped_steps": float(not applied), "lr": actor.lr()}
    if actor.moe:
        out.update(actor.moe.metrics(len(mini)))
    for key in per_micro[0] if per_micro else ():
        vals = torch.stack([torch.as_tensor(m[key], dtype=torch.float64) for m in per_micro])
        # Additive metrics are already divided by the global token count: their sum over
        # micro-batches (and, in reduce_metrics, over DP ranks) is the mini-batch value.
        # Quantiles of filler micro-batches (no tokens) are NaN.
        out[key] = float(vals.nanmean() if key in NON_ADDITIVE_METRICS else vals.sum())
    return out


def sync_engine(cfg, actor, engine) -> dict:
    """Stream the updated weights into this rank's engine (every rank calls it; ranks without
    an engine, the non-leader ranks of a tensor-parallel engine, only take part in the
    gathers). The manifest (every HF name and shape, from the model config) goes first, so an
    engine refuses a mismatched set before anything is loaded."""

    weights = actor.full_hf_weights()
    if engine is None:
        for _ in weights:
            pass
        return {}
    stats = sync_weights(engine, weights, cfg.rollout.weight_sync_bucket_mb << 20,
                         manifest=HFLayout.from_config(actor.hf_config).hf_shapes())
    return {"sync/bytes": float(stats.bytes), "sync/seconds": stats.seconds,
            "sync/gib_per_s": stats.bytes_per_second / 2**30}
