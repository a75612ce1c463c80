"""The training stages of one RL step, called by ``rl.train`` in order.

``micro_batches_for_rank``: this data-parallel rank's share of the global batch, as
micro-batches per mini-batch. ``score_old_logprobs``: one no-grad pass through the pipeline
schedule for ``old_logp`` / ``old_entropy`` ``[b, s]``. ``update``: one mini-batch of
policy-loss forward/backward and an optimizer step. ``sync_engine``: weights -> engine.
"""

from __future__ import annotations

import torch

from megatron_erc.algorithms import (
    NON_ADDITIVE_METRICS,
    policy_loss,
    positive_nll,
    positive_token_mask,
)
from megatron_erc.trainer.batch import (
    MicroBatch,
    Sequence,
    global_token_count,
    model_width,
    pack,
    plan_minibatches,
)


def micro_batches_for_rank(groups: list[list[Sequence]], *, updates: int, dp_size: int,
                           dp_rank: int, micro_batch_size: int, seq_len: int, pad_id: int,
                           device, fixed_rows: bool = True) -> list[list[MicroBatch]]:
    """``[mini][micro]`` micro-batches of ``dp_rank`` for the global ``groups``.

    Every DP rank gets the same number of mini-batches and, per mini-batch, the same number of
    micro-batches (the most any rank needs); a micro-batch a rank has no sequences for is a
    zero-weight filler row. All micro-batches of a rank share one width ``S`` (from its longest
    sequence); with ``fixed_rows`` (pipeline parallelism: stages exchange activations of one
    shape) they also have exactly ``micro_batch_size`` rows, padded with filler rows.
    """
    plan = plan_minibatches([sum(len(s) for s in g) for g in groups], updates, dp_size)
    mine = [[s for g in mini[dp_rank] for s in groups[g]] for mini in plan]
    width = model_width(max((len(s) for seqs in mine for s in seqs), default=2), seq_len)
    out = []
    for m, seqs in enumerate(mine):
        count = max(-(-sum(len(groups[g]) for g in ids) // micro_batch_size)
                    for ids in plan[m])
        chunks = [seqs[i * micro_batch_size:(i + 1) * micro_batch_size]
                  for i in range(max(count, 1))]
        out.append([pack(c, micro_batch_size if fixed_rows else max(len(c), 1), width, pad_id,
                         device) for c in chunks])
    return out


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

    actor.forward_backward(micro_batches, loss_fn, forward_only=True)


def policy_loss_fn(cfg, actor, mini: list[MicroBatch]):
    """The per-micro-batch loss of one mini-batch: token-mean over its global response
    tokens (all micro-batches, all DP ranks), so neither the split nor DP changes it."""
    dp = actor.dp_group
    num_tokens = global_token_count(mini, dp_group=dp)
    positive = {id(mb): positive_token_mask(mb.loss_mask, mb.rewards) for mb in mini}
    pos_tokens = global_token_count(mini, lambda mb: positive[id(mb)], dp_group=dp)
    algo = cfg.algo

    def loss_fn(logits, mb):
        logp, ent = actor.logprobs(logits, mb.labels, chunk_mb=algo.logprob_chunk_mb)
        if mb.old_logp is None:  # first mini-batch: no update yet, so the current policy is
            mb.old_logp, mb.old_entropy = logp.detach(), ent.detach()  # the old one
        loss, m = policy_loss(
            logp, mb.old_logp, mb.advantages, mb.loss_mask, cfg=algo, entropy=ent,
            old_entropy=mb.old_entropy, rollout_logp=mb.rollout_logp if algo.tis_cap else None,
            num_tokens=num_tokens)
        if algo.pos_nll_coef:
            loss = loss + algo.pos_nll_coef * positive_nll(
                logp, mb.loss_mask, mb.rewards, num_tokens=pos_tokens)
        return loss, {**m, "loss": loss.detach()}

    return loss_fn


def update(cfg, actor, mini: list[MicroBatch]) -> dict:
    """One optimizer step on a mini-batch."""
    loss_fn = policy_loss_fn(cfg, actor, mini)
    per_micro = actor.forward_backward(mini, loss_fn)
    applied, grad_norm = actor.step()
    out = {"grad_norm": grad_norm, "skipped_steps": float(not applied), "lr": actor.lr()}
    for key in per_micro[0] if per_micro else ():
        vals = torch.stack([torch.as_tensor(m[key], dtype=torch.float64) for m in per_micro])
        # Additive metrics are already divided by the global token count: their sum over
        # micro-batches (and, in reduce_metrics, over DP ranks) is the mini-batch value.
        # Quantiles of filler micro-batches (no tokens) are NaN.
        out[key] = float(vals.nanmean() if key in NON_ADDITIVE_METRICS else vals.sum())
    return out


def sync_engine(cfg, actor, engine) -> dict:
    """Stream the updated weights into this rank's engine in buckets (every rank calls it;
    ranks without an engine, the non-leader ranks of a tensor-parallel engine, only take part
    in the gathers)."""
    from megatron_erc.rollout import sync_weights

    weights = actor.full_hf_weights()
    if engine is None:
        for _ in weights:
            pass
        return {}
    stats = sync_weights(engine, weights, cfg.rollout.weight_sync_bucket_mb << 20)
    return {"sync/bytes": float(stats.bytes), "sync/seconds": stats.seconds}
