"""The optimizer's part of a training checkpoint: which format megatron's distributed
optimizer writes, and loading it back around megatron-core 0.16.1's rough edges.

Two formats of the distributed optimizer's state (``checkpoint.optimizer_format``):

* ``dp_reshardable`` (the default): each data-parallel rank writes the shard of the
  optimizer buckets it owns, as it holds it: no gather, no copy, every rank writes in
  parallel. It resumes at any DP size but only at the same TP / PP / VPP (the buckets
  follow the model-parallel split).
* ``fully_reshardable``: at save, every rank gathers its whole model-parallel shard's
  optimizer state to host memory and writes it in model (global tensor) space, like plain
  Adam: it resumes at any TP / PP / DP. Asked for when a layout change is coming.

A plain (non-distributed) optimizer is always written in model space; the format does not
apply to it.
"""

from __future__ import annotations

import torch

from megatron_erc.checkpoint.steps import CheckpointError
from megatron_erc.trainer.actor import torch_optimizers

OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
"""Values of ``checkpoint.optimizer_format``, fastest first."""


def sharding_metadata(optimizer_format: str) -> dict:
    """What megatron's ``sharded_state_dict`` reads to pick the distributed-optimizer format
    (megatron's own default, ``fully_sharded_model_space``, rejects our unflattened
    parameters with "flattened_range is not supported")."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format must be one of {OPTIMIZER_FORMATS}, got "
                         f"{optimizer_format!r}")
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def init_empty_optimizer_state(optimizer) -> None:
    """Give a never-stepped torch Adam its state tensors, ``step`` included.

    megatron-core 0.16.1's distributed optimizer reads ``state["step"]`` of every parameter
    when building the state dict it loads into, and asserts on an empty state (a freshly
    built actor). The values are overwritten by the load.
    """
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                state.setdefault("step", torch.tensor(0.0))


def _untie_adam_steps(optimizer) -> None:
    """One ``step`` tensor per parameter after a load.

    megatron-core 0.16.1 restores the distributed optimizer's steps as one tensor shared by
    every parameter; torch Adam increments it in place once per parameter, which skews the
    bias correction of every later step. A checkpoint written before the first optimizer
    step has no step at all (torch Adam then raises ``KeyError: 'step'``): start at 0.
    """
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            step = state.get("step")
            state["step"] = (step.detach().clone().float() if torch.is_tensor(step)
                             else torch.tensor(float(step or 0.0)))


def load_optimizer(optimizer, state_dict) -> None:
    """Load what ``dist_checkpointing.load`` returned for ``optimizer`` (either format)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", None)
    if inner is None:
        pairs = [(optimizer, state_dict)]
    elif len(inner) == 1:  # a chain of one saves its member's state dict unwrapped
        pairs = [(inner[0], state_dict)]
    else:
        pairs = [(opt, state_dict[i]) for i, opt in enumerate(inner)]
    for opt, sd in pairs:
        if isinstance(opt, DistributedOptimizer):
            _load_distributed_optimizer(opt, sd)
        else:
            opt.load_state_dict(sd)
    if inner is not None and len(inner) > 1:
        optimizer._synchronize_steps()
    _untie_adam_steps(optimizer)


def _load_distributed_optimizer(opt, state_dict: dict) -> None:
    """``DistributedOptimizer.load_state_dict`` in two halves, around a megatron-core 0.16.1
    bug: it copies every per-parameter state entry from the checkpoint, ``step`` included,
    which neither format stores per parameter (``KeyError: 'step'`` or a stale 0). The
    steps come from the param groups; the per-parameter loads must not overwrite them.
    """
    sharding = state_dict.get("param_state_sharding_type")
    loaders = {"fully_reshardable": opt.load_parameter_state_from_fully_reshardable,
               "dp_reshardable": opt.load_parameter_state_from_dp_reshardable}
    if sharding not in loaders:
        raise CheckpointError(f"distributed-optimizer state in format {sharding!r}; only "
                              f"{sorted(loaders)} checkpoints can be resumed")
    # param groups (lr, Adam step) and grad scaler; allocates the state tensors
    opt.load_state_dict({k: v for k, v in state_dict.items()
                         if k not in ("param_state", "param_state_sharding_type")})
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    try:
        with torch.no_grad():  # megatron's dp_reshardable loader copies into the main params
            loaders[sharding](state_dict["param_state"])
    finally:
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step


def check_layout_for_format(marker: dict, layout: dict, distributed: bool, path) -> None:
    """A ``dp_reshardable`` distributed-optimizer checkpoint resumes only at its own TP / PP /
    VPP; say so, with the way out, before anything loads."""
    fmt = marker.get("sharding_metadata", {}).get("distrib_optim_sharding_type")
    if not distributed or fmt != "dp_reshardable":
        return
    changed = {k: (marker.get(k), layout[k]) for k in ("tp", "pp", "vpp")
               if marker.get(k) != layout[k]}
    if changed:
        saved = ", ".join(f"{k}={a}" for k, (a, _) in changed.items())
        now = ", ".join(f"{k}={b}" for k, (_, b) in changed.items())
        raise CheckpointError(
            f"{path} holds the distributed optimizer's state in the dp_reshardable format, "
            f"which resumes only at the layout it was written at ({saved}; this run: {now}; "
            "the data-parallel size may change). Resume once at the saved layout with "
            "checkpoint.optimizer_format=fully_reshardable and save (for example "
            "checkpoint.every=1 for one more step, or a stop signal), then resume that "
            "checkpoint at the new layout.")
