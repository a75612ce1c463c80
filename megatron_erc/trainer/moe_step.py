"""What the RL step does for a mixture-of-experts actor: routing replay
(``algo.routing_replay``) around the scoring and update forwards, and the ``moe/*`` metrics
of each update (``moe/aux_loss``, ``moe/z_loss`` without their coefficients, and the
busiest / idlest expert's load over the mean).

Routing replay (``old``): the forward that scores the off-policy mini-batches' old log-probs
records each router's experts; the update forwards of those mini-batches take the same
experts (``models/routing_replay.py``), so the importance ratio and ERC's entropy ratio
compare one network. The first (on-policy) mini-batch has no scoring forward: its own
update forward is the one its old log-probs come from, so it routes normally.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_erc.models.moe import (
    ExpertLoad,
    is_moe,
    moe_loss_metrics,
    num_experts,
    sparse_layers,
)
from megatron_erc.models.routing_replay import RoutingReplay


class MoESteps:
    """Hooks on one actor's routers. Collective at construction (every rank)."""

    def __init__(self, actor, routing_replay: str):
        cfg = actor.hf_config
        self.num_layers = len(sparse_layers(cfg))
        self.num_moe_layers = sum(sparse_layers(cfg))
        self.num_experts = num_experts(cfg)
        self.replay = (RoutingReplay(actor.model, recompute=actor.parallel.recompute,
                                     pp=actor.parallel.pp)
                       if routing_replay == "old" else None)
        self.load = ExpertLoad(actor.model)
        # megatron's aux-loss reduction is a collective over the pipeline: a stage without a
        # MoE layer would skip it and the others would wait; such layouts log load only
        has = torch.tensor(float(self.load.routers > 0))
        if dist.is_initialized():
            dist.all_reduce(has, op=dist.ReduceOp.MIN)
        self.losses_on_every_stage = bool(has.item())

    @contextlib.contextmanager
    def scoring(self):
        """Around the forward that scores old log-probs (records the experts)."""
        with self.replay.recording() if self.replay else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def updating(self, scored: bool):
        """Around an update forward-backward; ``scored``: its old log-probs came from the
        scoring forward (replay its experts)."""
        from megatron.core.transformer.moe import moe_utils

        moe_utils.clear_aux_losses_tracker()  # this update's losses only
        with self.replay.replaying() if self.replay and scored else contextlib.nullcontext():
            yield

    def metrics(self, num_microbatches: int) -> dict[str, float]:
        """This update's ``moe/*`` metrics, the same on every rank (collective)."""
        out = self.load.metrics(self.num_layers, self.num_experts)
        if self.losses_on_every_stage:
            out.update(moe_loss_metrics(num_microbatches, self.num_moe_layers))
        if self.replay is not None:
            misses = torch.tensor(float(self.replay.misses))
            if dist.is_initialized():
                dist.all_reduce(misses)
            out["moe/replay_misses"] = float(misses.item())
            self.replay.misses = 0
        return out


def moe_steps(actor, routing_replay: str) -> MoESteps | None:
    """The hooks for an MoE actor; None for a dense one (``routing_replay`` must be none)."""
    if is_moe(actor.hf_config):
        return MoESteps(actor, routing_replay)
    if routing_replay != "none":
        raise ValueError(f"algo.routing_replay={routing_replay!r} needs a mixture-of-experts "
                         f"model; {actor.hf_config.model_type} routes nothing: set "
                         "algo.routing_replay=none")
    return None
