"""The stages of one RL step, called by ``rl.train`` in order.

``collect_rollouts``: generate n responses per prompt, grade, shape, filter (DAPO dynamic
sampling), GRPO advantages, pack. ``score_old_logprobs``: one no-grad pass through the
pipeline schedule for ``old_logp`` / ``old_entropy`` ``[b, s]``. ``update``: one
mini-batch of policy-loss forward/backward and an optimizer step.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from megatron_erc.algorithms import (
    NON_ADDITIVE_METRICS,
    apply_overlong_shaping,
    dynamic_sampling_filter,
    grpo_advantages,
    policy_loss,
    positive_nll,
    positive_token_mask,
)
from megatron_erc.trainer.batch import global_token_count, pack_rollouts

log = logging.getLogger(__name__)

# policy_loss metrics (and the loss) are divided by the global token count: they add up
# over micro-batches and data-parallel ranks (except NON_ADDITIVE_METRICS, the quantiles).
LOSS_METRICS_PREFIXES = ("loss", "clip", "erc", "kl", "tis", "mismatch", "entropy")


def collect_rollouts(cfg, ctx, sampling, t: dict):
    """This data-parallel replica's training batch, generated on its engine rank and
    broadcast to the replica's other (TP/PP) ranks. Returns ``(batch or None, metrics)``."""
    from megatron.core import parallel_state as ps

    out = [None, {}]
    if ctx.engine is not None:
        out = list(_generate_batch(cfg, ctx, sampling, t))
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        src = dist.get_global_rank(group, 0)
        dist.broadcast_object_list(out, src=src, group=group)
    return out[0], out[1]


def _generate_batch(cfg, ctx, sampling, t: dict):
    """Up to ``prompts_per_step`` groups with non-equal rewards, packed for training;
    ``None`` when no group survived any round."""
    r, tokenizer, n = cfg.rollout, ctx.tokenizer, cfg.rollout.n
    kept, metrics, gen_s, rounds = [], {}, 0.0, 0
    while len(kept) < r.prompts_per_step and rounds < r.max_gen_batches:
        chosen = ctx.rng.sample(ctx.prompts, min(r.prompts_per_step, len(ctx.prompts)))
        t0 = time.perf_counter()
        groups = ctx.engine.generate([p for p, _ in chosen], sampling)
        gen_s += time.perf_counter() - t0
        flat = [s for g in groups for s in g]
        result = ctx.grader.grade([tokenizer.decode(s.token_ids) for s in flat],
                                  [a for _, a in chosen for _ in range(n)])
        raw = torch.tensor(result.rewards, dtype=torch.float32)
        lengths = torch.tensor([len(s.token_ids) for s in flat], dtype=torch.float32)
        shaped = apply_overlong_shaping(raw, lengths, cfg.overlong) if cfg.overlong else raw
        gids = torch.arange(len(chosen)).repeat_interleave(n)
        filt = dynamic_sampling_filter(shaped, gids)
        if rounds == 0:  # first round: unbiased statistics of the current policy
            metrics.update({
                "reward/mean": float(shaped.mean()),
                "accuracy": float((raw == 1).float().mean()),
                "response/len_mean": float(lengths.mean()),
                "response/len_max": float(lengths.max()),
                "response/clipped_frac": float(
                    sum(s.finish_reason == "length" for s in flat) / len(flat)),
                **{k: float(v) for k, v in result.counts.items()}})
        for g in filt.kept_group_ids.tolist():
            kept.append((chosen[g][0], groups[g], shaped[g * n:(g + 1) * n]))
        rounds += 1
    t["generate_s"] = gen_s
    if len(kept) < r.prompts_per_step:
        log.warning("dynamic sampling: only %d of %d groups have non-equal rewards after %d "
                    "rounds; training on what there is", len(kept), r.prompts_per_step, rounds)
    kept = kept[: r.prompts_per_step]  # the last round may overshoot
    metrics.update({"dynamic_sampling/groups_kept": len(kept), "dynamic_sampling/rounds": rounds})
    if not kept:
        return None, metrics
    rewards = torch.cat([r for _, _, r in kept])
    gids = torch.arange(len(kept)).repeat_interleave(n)
    batch = pack_rollouts(
        [p for p, g, _ in kept for _ in g], [s.token_ids for _, g, _ in kept for s in g],
        [s.logprobs for _, g, _ in kept for s in g], grpo_advantages(rewards, gids), rewards,
        tokenizer.pad_token_id, cfg.run.seq_len)
    return batch, metrics


def score_old_logprobs(actor, micro_batches: list[dict]) -> None:
    """Adds ``old_logp`` and ``old_entropy`` ``[b, s]`` to each micro-batch (last PP stage).

    ``rl.train`` calls it for the off-policy mini-batches only: a micro-batch without
    ``old_logp`` gets the detached log-probs of its own update forward (``policy_loss_fn``),
    which are the same numbers, since no optimizer step has happened in between.
    """

    def loss_fn(logits, mb):
        logp, ent = actor.logprobs(logits.detach(), mb["labels"], chunk_size=4096)
        mb["old_logp"], mb["old_entropy"] = logp, ent
        return logp.new_zeros(()), {}

    actor.forward_backward(micro_batches, loss_fn, forward_only=True)


def policy_loss_fn(cfg, actor, mini: list[dict]):
    """The per-micro-batch loss of one mini-batch: token-mean over its global response
    tokens (all micro-batches, all DP ranks), so neither the split nor DP changes it."""
    dp = actor.dp_group
    num_tokens = global_token_count(mini, dp_group=dp)
    for mb in mini:
        mb["positive_mask"] = positive_token_mask(mb["loss_mask"], mb["rewards"])
    pos_tokens = global_token_count(mini, "positive_mask", dp_group=dp)

    def loss_fn(logits, mb):
        logp, ent = actor.logprobs(logits, mb["labels"])
        if "old_logp" not in mb:  # first mini-batch: no update yet, so the current policy is
            mb["old_logp"], mb["old_entropy"] = logp.detach(), ent.detach()  # the old one
        loss, m = policy_loss(
            logp, mb["old_logp"], mb["advantages"], mb["loss_mask"], cfg=cfg.algo,
            entropy=ent, old_entropy=mb["old_entropy"],
            rollout_logp=mb["rollout_logp"] if cfg.algo.tis_cap else None, num_tokens=num_tokens)
        if cfg.algo.pos_nll_coef:
            loss = loss + cfg.algo.pos_nll_coef * positive_nll(
                logp, mb["loss_mask"], mb["rewards"], num_tokens=pos_tokens)
        return loss, {**m, "loss": loss.detach()}

    return loss_fn


def update(cfg, actor, mini: list[dict]) -> dict:
    """One optimizer step on a mini-batch."""
    loss_fn = policy_loss_fn(cfg, actor, mini)
    per_micro = actor.forward_backward(mini, loss_fn)
    applied, grad_norm = actor.step()
    out = {"grad_norm": grad_norm, "skipped_steps": float(not applied), "lr": actor.lr()}
    for key in per_micro[0] if per_micro else ():
        vals = torch.stack([torch.as_tensor(m[key], dtype=torch.float64) for m in per_micro])
        # Additive metrics are already divided by the global token count: their sum over
        # micro-batches (and, in reduce_metrics, over DP ranks) is the mini-batch value.
        out[key] = float(vals.mean() if key in NON_ADDITIVE_METRICS else vals.sum())
    return out


def engine_weights(actor):
    """The whole model as HF ``(name, tensor)`` pairs on the engine's rank (TP rank 0 of the
    first pipeline stage). Every rank must exhaust the iterator: TP ranks gather their shards
    in lockstep, later pipeline stages send their layers to the first stage."""
    from megatron.core import parallel_state as ps

    from megatron_erc.models.pipeline_weights import stream_pipeline_weights

    weights = actor.hf_weights()
    if actor.parallel.pp > 1 and actor.tp_rank == 0:
        weights = stream_pipeline_weights(weights, ps.get_pipeline_model_parallel_group())
    return weights


def sync_engine(cfg, actor, engine) -> dict:
    """Stream the updated weights into the engine in buckets (see ``engine_weights``)."""
    from megatron_erc.rollout import sync_weights

    weights = engine_weights(actor)
    if engine is None:
        for _ in weights:
            pass
        return {}
    stats = sync_weights(engine, weights, cfg.rollout.weight_sync_bucket_mb << 20)
    return {"sync/bytes": float(stats.bytes), "sync/seconds": stats.seconds}


def reduce_metrics(m: dict, actor) -> dict:
    """Step metrics for the whole job: loss metrics (already per global token) summed over
    data-parallel ranks, the rest averaged. Only ranks of the last pipeline stage compute
    loss metrics; they are first copied to the other stages over the pipeline group."""
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:  # loss metrics: from the last stage to the others
        last = [m]
        dist.broadcast_object_list(last, src=dist.get_global_rank(
            pp_group, dist.get_world_size(pp_group) - 1), group=pp_group)
        m = {**last[0], **m}
    group = ps.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return m
    keys = sorted(m)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {k: m[k] for k in keys}, group=group)
    out = {}
    for k in {k for g in gathered for k in g}:
        vals = [g[k] for g in gathered if k in g]
        additive = k in LOSS_METRICS_PREFIXES or k.split("/")[0] in LOSS_METRICS_PREFIXES
        additive = additive and k not in NON_ADDITIVE_METRICS
        out[k] = sum(vals) if additive else sum(vals) / len(vals)
    return out
