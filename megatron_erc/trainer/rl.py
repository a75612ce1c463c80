"""The RL loop: rollout -> score -> advantages -> update -> sync, on one screen.

``train`` reads like the algorithm; the pieces live in ``steps.py`` (and, below them,
``rollout/``, ``rewards/``, ``algorithms/``, ``trainer/actor.py``). ``RunContext`` carries
what ``run.py`` wired together.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from megatron_erc.rollout import SamplingConfig
from megatron_erc.trainer.batch import split
from megatron_erc.trainer.config import TrainConfig
from megatron_erc.trainer.steps import (
    collect_rollouts,
    reduce_metrics,
    score_old_logprobs,
    sync_engine,
    update,
)


@dataclasses.dataclass
class RunContext:
    actor: Any
    engine: Any | None          # only on the rank that generates for its data-parallel replica
    grader: Any | None
    tokenizer: Any
    prompts: list               # (prompt_ids, answer) pairs
    validate: Callable[[], float] | None
    log: Callable[[dict], None]
    should_stop: Callable[[], bool]
    save: Callable[[int], None]
    rng: Any
    start_step: int = 0


def train(cfg: TrainConfig, ctx: RunContext) -> list[dict]:
    r = cfg.rollout
    sampling = SamplingConfig(n=r.n, temperature=r.temperature, max_tokens=r.max_response_tokens,
                              stop_token_ids=(ctx.tokenizer.eos_token_id,))
    history = []
    for step in range(ctx.start_step + 1, cfg.run.steps + 1):
        t = {"start": time.perf_counter()}
        batch, m = collect_rollouts(cfg, ctx, sampling, t)                  # generate + grade
        t["score"] = time.perf_counter()
        if batch is not None:
            minis = _minibatches(split(batch, cfg.run.micro_batch_size),
                                 cfg.run.updates_per_rollout)
            # old logp/entropy of the off-policy mini-batches; the first one is on-policy:
            # its own update forward supplies them (see steps.policy_loss_fn)
            score_old_logprobs(ctx.actor, [mb for mini in minis[1:] for mb in mini])
            t["forward"] = time.perf_counter()
            per_update = [update(cfg, ctx.actor, mini) for mini in minis]  # updates 2.. off-policy
            t["update"] = time.perf_counter()
            m.update(_mean(per_update))
            m.update(sync_engine(cfg, ctx.actor, ctx.engine))               # weights -> engine
            t["sync"] = time.perf_counter()
            m.update(_time_split(t, batch))
        else:  # every group had equal rewards in every round: nothing to learn from
            m["skipped_steps"] = 1.0
        m = reduce_metrics(m, ctx.actor)
        if ctx.validate and (step % cfg.validation.every == 0 or step == cfg.run.steps):
            m["val/accuracy"] = ctx.validate()
        m["step"] = step
        ctx.log(m)
        history.append(m)
        stop = ctx.should_stop()  # SIGTERM: save and leave cleanly
        if stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            ctx.save(step)
        if stop:
            break
    return history


def _minibatches(micro: list[dict], updates: int) -> list[list[dict]]:
    """Split the rollout's micro-batches into ``updates`` mini-batches (fewer if short)."""
    per = max(1, -(-len(micro) // updates))
    return [micro[i: i + per] for i in range(0, len(micro), per)]


def _mean(dicts: list[dict]) -> dict:
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


def _time_split(t: dict, batch: dict) -> dict:
    gen = t.get("generate_s", 0.0)
    total = t["sync"] - t["start"]
    return {"time/generate": gen, "time/score": t["score"] - t["start"] - gen,
            "time/forward": t["forward"] - t["score"], "time/update": t["update"] - t["forward"],
            "time/sync": t["sync"] - t["update"], "time/step": total,
            "tokens_per_s": float(batch["loss_mask"].sum()) / max(total, 1e-9)}
