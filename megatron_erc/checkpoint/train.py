"""Training checkpoints: model, optimizer, LR schedule, RNG and trainer state, resumable at
any TP/PP.

A checkpoint is ``root/step_{step:08d}/`` holding:

* what megatron-core's ``dist_checkpointing`` (torch_dist) writes for
  ``{"model": ..., "optimizer": ...}`` (``model0``, ``model1``, ... with virtual pipeline
  stages). Tensors are keyed by their global (unsharded) names, so a checkpoint written at
  one TP/PP loads at another. The distributed optimizer is saved in the
  ``fully_reshardable`` format (the default one rejects our unflattened parameters);
* ``megatron_erc.json`` and ``hf/config.json`` as a converted checkpoint has them
  (``checkpoint.io``), so ``megatron-to-hf`` exports a training checkpoint directly;
* ``trainer_state.pt``: the step and the actor's LR-scheduler state when it has one;
* ``ranks/rank_XXXXX.pt``: each rank's ``extra_state`` (data-loader position, sampler RNG,
  ...) and its python / numpy / torch (CPU, CUDA) / megatron tensor-parallel tracker RNG
  states;
* ``COMPLETE``: JSON written last, before the directory gets its final name, listing every
  file with its size (``checkpoint.steps``: a truncated or missing file is found before
  anything is loaded, and ``resume=auto`` skips such a checkpoint).

Every rank writes into ``root/.step_{step:08d}.tmp-<uuid>``; after a barrier rank 0 writes
the side files and the marker and renames the directory into place, so a writer killed at
any point leaves either the previous set of checkpoints or the new one, never a
half-written ``step_*`` directory. Files written with ``torch.save`` are read back with
``weights_only=True`` only.

megatron-core is imported inside the functions that use it: it takes seconds to
import, and the commands check their inputs before it loads.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import random
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from megatron_erc.checkpoint.io import HF_SUBDIR, publish, write_model_meta, write_synced
from megatron_erc.checkpoint.steps import (
    COMPLETE_FILE,
    FORMAT,
    RANKS_SUBDIR,
    TRAINER_STATE_FILE,
    CheckpointError,
    check_resumable,
    find_latest,
    manifest,
    prune,
    read_marker,
    step_dir,
)
from megatron_erc.platform import require_supported_megatron
from megatron_erc.trainer.actor import torch_optimizers

logger = logging.getLogger(__name__)

# The default distributed-optimizer format raises "flattened_range is not supported";
# fully_reshardable stores optimizer state in model (global tensor) space like plain Adam.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                     "chained_optim_avoid_prefix": True}


# ---------------------------------------------------------------- state dicts
def _model_keys(actor) -> list[str]:
    return ["model"] if len(actor.model) == 1 else [f"model{i}" for i in range(len(actor.model))]


def _sharded_state_dict(actor, *, is_loading: bool) -> dict:
    state = {key: chunk.module.sharded_state_dict()
             for key, chunk in zip(_model_keys(actor), actor.model, strict=True)}
    if is_loading:
        _init_empty_optimizer_state(actor.optimizer)
    state["optimizer"] = actor.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=dict(SHARDING_METADATA))
    return state


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _init_empty_optimizer_state(optimizer) -> None:
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


def _load_optimizer(optimizer, state_dict) -> None:
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
    which the fully_reshardable format does not store per parameter (``KeyError: 'step'``).
    """
    sharding = state_dict.get("param_state_sharding_type")
    if sharding != "fully_reshardable":
        raise CheckpointError(f"distributed-optimizer state in format {sharding!r}; only "
                              "'fully_reshardable' checkpoints can be resumed")
    # param groups (lr, Adam step) and grad scaler; allocates the state tensors
    opt.load_state_dict({k: v for k, v in state_dict.items()
                         if k not in ("param_state", "param_state_sharding_type")})
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(state_dict["param_state"])
    finally:
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in
                    tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _coords() -> list[int]:
    from megatron.core import parallel_state as ps

    return [ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank()]


def _layout(actor) -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": actor.parallel.tp,
            "pp": actor.parallel.pp, "vpp": actor.parallel.vpp,
            "dp": ps.get_data_parallel_world_size()}


# ---------------------------------------------------------------- save
def save_checkpoint(root: str | os.PathLike, step: int, actor, extra_state: dict, *,
                    keep_last: int, parallel: bool = True) -> pathlib.Path:
    """Write ``root/step_{step:08d}`` (collective: every rank calls it).

    ``parallel``: the data-parallel replicas write disjoint shares of the tensors they all
    hold (megatron's fully parallel save); otherwise the first replica writes them all. The
    files and their format are the same either way.

    ``extra_state`` is this rank's trainer state (data-loader position, sampler RNG, ...):
    dicts, lists, tuples, strings, numbers, None and tensors only (it is read back with
    ``weights_only=True``). ``keep_last`` complete checkpoints are kept (0 keeps all); the
    one just written is never deleted. An existing checkpoint of the same step is replaced.
    """
    from megatron.core import dist_checkpointing

    require_supported_megatron("checkpoint saving (megatron's optimizer internals)")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    root, rank = pathlib.Path(root), dist.get_rank()
    final = step_dir(root, step)
    name = [f".{final.name}.tmp-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    t0 = time.perf_counter()
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()

    dist_checkpointing.save(_sharded_state_dict(actor, is_loading=False), str(tmp),
                            sharded_strategy=_save_strategy(parallel),
                            content_metadata={"format": FORMAT, **SHARDING_METADATA})
    if rank == 0:
        trainer_state = {"step": step}
        scheduler = getattr(actor, "lr_scheduler", None)
        if scheduler is not None:
            trainer_state["lr_scheduler"] = scheduler.state_dict()
        _save_checked(trainer_state, tmp / TRAINER_STATE_FILE)
    (tmp / RANKS_SUBDIR).mkdir(exist_ok=True)
    _save_checked({"extra_state": dict(extra_state), "rng": _rng_state()},
                  tmp / RANKS_SUBDIR / f"rank_{rank:05d}.pt")
    coords = [None] * dist.get_world_size()
    dist.all_gather_object(coords, _coords())  # also: every rank's files are on disk

    if rank == 0:
        write_model_meta(tmp, actor.parallel, actor.hf_config.vocab_size, f"training step {step}")
        actor.hf_config.to_json_file(str(_mkdir(tmp / HF_SUBDIR) / "config.json"))
        marker = {"format": FORMAT, "step": step, "time": time.time(),
                  "distributed_optimizer": _is_distributed(actor.optimizer),
                  "sharding_metadata": SHARDING_METADATA, **_layout(actor),
                  "rank_coords": coords, "files": manifest(tmp)}
        write_synced(tmp / COMPLETE_FILE, json.dumps(marker, indent=2))
        publish(tmp, final)
        prune(root, keep_last, final)
        logger.info("saved %s in %.1f s", final, time.perf_counter() - t0)
    dist.barrier()
    return final


def _save_strategy(parallel: bool):
    """megatron's default torch_dist writer, wrapped so that each data-parallel replica writes
    a balanced, disjoint share of the replicated tensors (None: the default, where the first
    replica writes them all)."""
    from megatron.core import parallel_state as ps

    if not parallel or ps.get_data_parallel_world_size() == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        ps.get_data_parallel_group(with_context_parallel=True))


def _mkdir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_checked(obj: dict, path: pathlib.Path) -> None:
    torch.save(obj, path)
    try:
        torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to change (a caller's bug)
        raise TypeError(
            "extra_state (and the LR-scheduler state) must hold only dicts, lists, tuples, "
            f"strings, numbers, None and tensors so that it loads with weights_only=True: {e}"
        ) from None


# ---------------------------------------------------------------- load
def load_checkpoint(path_or_auto: str | os.PathLike, root: str | os.PathLike | None,
                    actor) -> tuple[int, dict] | None:
    """Restore model, optimizer, LR scheduler and RNG states into ``actor`` (collective).

    ``path_or_auto`` is a checkpoint directory, or ``"auto"`` for the newest complete and
    intact one under ``root`` (None when there is none: a fresh start; damaged ones are
    skipped with a warning). A damaged or incomplete checkpoint raises ``CheckpointError``
    on every rank. The checkpoint may have been
    written at another TP/PP (and DP for the distributed optimizer); RNG states are
    restored only when the rank layout is the same. Returns ``(step, extra_state)`` with
    this rank's saved ``extra_state`` (see ``_matching_rank`` after a layout change).
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    if str(path_or_auto) == "auto":
        if root is None:
            raise ValueError('load_checkpoint("auto", root=None): pass the checkpoint root')
        found = [None]
        if rank == 0:
            try:
                found[0] = find_latest(root)
            except CheckpointError as e:
                found[0] = e
        dist.broadcast_object_list(found, src=0)  # every rank resumes the same checkpoint
        if isinstance(found[0], CheckpointError):
            raise CheckpointError(str(found[0]))
        if found[0] is None:
            return None
        path = pathlib.Path(found[0])
    else:
        path = check_resumable(path_or_auto)  # every rank sees the same files
    marker = read_marker(path)
    if marker["distributed_optimizer"] != _is_distributed(actor.optimizer):
        raise CheckpointError(
            f"{path} was written with optim.use_distributed_optimizer="
            f"{marker['distributed_optimizer']}; resume with the same setting")

    trainer_state = _load_file(path / TRAINER_STATE_FILE)
    state = _sharded_state_dict(actor, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    for key, chunk in zip(_model_keys(actor), actor.model, strict=True):
        chunk.module.load_state_dict(loaded[key])
    _load_optimizer(actor.optimizer, loaded["optimizer"])

    scheduler = getattr(actor, "lr_scheduler", None)
    if scheduler is not None:
        if "lr_scheduler" not in trainer_state:
            raise CheckpointError(f"{path} has no LR-scheduler state but the actor has one")
        scheduler.load_state_dict(trainer_state["lr_scheduler"])

    same_layout = all(marker.get(k) == v for k, v in _layout(actor).items())
    source = rank if same_layout else _matching_rank(marker, actor)
    rank_state = _load_file(path / RANKS_SUBDIR / f"rank_{source:05d}.pt", rank_local=True)
    if same_layout:
        _set_rng_state(rank_state["rng"])
    elif rank == 0:
        logger.warning("%s was written at %s, now %s: RNG states are not restored; "
                       "extra_state comes from the saved rank of the same data-parallel rank "
                       "(rank 0's if the DP size changed)", path,
                       {k: marker.get(k) for k in _layout(actor)}, _layout(actor))
    dist.barrier()
    return int(trainer_state["step"]), rank_state["extra_state"]


def _load_file(path: pathlib.Path, rank_local: bool = False) -> dict:
    """``torch.load`` of a small checkpoint file; a damaged one is a ``CheckpointError``."""
    try:
        return torch.load(path, weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged: "
            "resume from an earlier one, or with checkpoint.resume=auto after moving this one "
            "away", rank_local=rank_local) from None


def _matching_rank(marker: dict, actor) -> int:
    """The saved rank whose ``extra_state`` this rank resumes after a layout change: the
    first one with the same data-parallel rank when the DP size is unchanged (the data
    stream is per DP rank), else rank 0."""
    from megatron.core import parallel_state as ps

    if marker["dp"] != ps.get_data_parallel_world_size():
        return 0
    dp_rank = ps.get_data_parallel_rank()
    return next(r for r, c in enumerate(marker["rank_coords"]) if c[0] == dp_rank)
