"""Training checkpoints: model, optimizer, LR schedule, RNG and trainer state, resumable at
any TP/PP.

A checkpoint is ``root/step_{step:08d}/`` holding:

* what megatron-core's ``dist_checkpointing`` (torch_dist) writes for
  ``{"model": ..., "optimizer": ...}`` (``model0``, ``model1``, ... with virtual pipeline
  stages). Tensors are keyed by their global (unsharded) names, so a checkpoint written at
  one TP/PP loads at another. The distributed optimizer's state is written in the format
  ``checkpoint.optimizer_format`` names (``optimizer_state``: ``dp_reshardable``, each DP
  rank its own shard, resumes at any DP size; ``fully_reshardable``, any layout);
* ``megatron_erc.json`` and ``hf/config.json`` as a converted checkpoint has them
  (``checkpoint.io``), so ``megatron-to-hf`` exports a training checkpoint directly;
* ``trainer_state.pt``: the step and the actor's LR-scheduler state when it has one;
* ``ranks/rank_XXXXX.pt``: each rank's ``extra_state`` (data-loader position, sampler RNG,
  ...) and its python / numpy / torch (CPU, CUDA) / megatron tensor-parallel tracker RNG
  states;
* ``COMPLETE``: JSON written last, before the directory gets its final name, listing every
  file with its size (``checkpoint.steps``: a truncated or missing file is found before
  anything is loaded, and ``resume=auto`` skips such a checkpoint).

Every rank writes into ``root/.step_{step:08d}.tmp-<uuid>`` (now, or in a forked writer
with ``checkpoint.async_save``); once every rank's writer is done rank 0 writes the marker
and renames the directory into place, so a writer killed at
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
import time
import uuid

import torch
import torch.distributed as dist

from megatron_erc.checkpoint.io import HF_SUBDIR, publish, write_model_meta, write_synced
from megatron_erc.checkpoint.optimizer_state import (
    check_layout_for_format,
    init_empty_optimizer_state,
    is_distributed,
    load_optimizer,
    sharding_metadata,
)
from megatron_erc.checkpoint.rng import rng_state, set_rng_state
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

logger = logging.getLogger(__name__)

FULLY_RESHARDABLE = sharding_metadata("fully_reshardable")
"""What a checkpoint whose marker names no format was written with (all before the format
became a setting)."""


# ---------------------------------------------------------------- state dicts
def _model_keys(actor) -> list[str]:
    return ["model"] if len(actor.model) == 1 else [f"model{i}" for i in range(len(actor.model))]


def _sharded_state_dict(actor, *, is_loading: bool, metadata: dict) -> dict:
    state = {key: chunk.module.sharded_state_dict()
             for key, chunk in zip(_model_keys(actor), actor.model, strict=True)}
    if is_loading:
        init_empty_optimizer_state(actor.optimizer)
    state["optimizer"] = actor.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=dict(metadata))
    return state


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
                    keep_last: int, parallel: bool = True,
                    optimizer_format: str = "dp_reshardable",
                    async_queue=None) -> pathlib.Path:
    """Write ``root/step_{step:08d}`` (collective: every rank calls it).

    ``parallel``: the data-parallel replicas write disjoint shares of the tensors they all
    hold (megatron's fully parallel save); otherwise the first replica writes them all.
    ``optimizer_format``: the distributed optimizer's format (``optimizer_state``).

    ``async_queue``: a megatron ``AsyncCallsQueue``: the tensors are written by a forked
    process (a copy-on-write snapshot of this moment) while training goes on, and the
    checkpoint is published by ``async_queue.maybe_finalize_async_calls`` once every rank's
    writer is done (``async_save.AsyncSaver`` drives it). Until then it is a temporary
    directory that ``resume=auto`` ignores. None: written before this returns.

    ``extra_state`` is this rank's trainer state (data-loader position, sampler RNG, ...):
    dicts, lists, tuples, strings, numbers, None and tensors only (it is read back with
    ``weights_only=True``). ``keep_last`` complete checkpoints are kept (0 keeps all); the
    one just written is never deleted. An existing checkpoint of the same step is replaced.
    """
    from megatron.core import dist_checkpointing

    require_supported_megatron("checkpoint saving (megatron's optimizer internals)")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    metadata = sharding_metadata(optimizer_format)
    root, rank = pathlib.Path(root), dist.get_rank()
    final = step_dir(root, step)
    name = [f".{final.name}.tmp-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    t0 = time.perf_counter()
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()

    request = dist_checkpointing.save(
        _sharded_state_dict(actor, is_loading=False, metadata=metadata), str(tmp),
        sharded_strategy=_save_strategy(parallel),
        content_metadata={"format": FORMAT, **metadata},
        async_sharded_save=async_queue is not None)
    if rank == 0:
        trainer_state = {"step": step}
        scheduler = getattr(actor, "lr_scheduler", None)
        if scheduler is not None:
            trainer_state["lr_scheduler"] = scheduler.state_dict()
        _save_checked(trainer_state, tmp / TRAINER_STATE_FILE)
        write_model_meta(tmp, actor.parallel, actor.hf_config.vocab_size, f"training step {step}")
        actor.hf_config.to_json_file(str(_mkdir(tmp / HF_SUBDIR) / "config.json"))
    (tmp / RANKS_SUBDIR).mkdir(exist_ok=True)
    _save_checked({"extra_state": dict(extra_state), "rng": rng_state()},
                  tmp / RANKS_SUBDIR / f"rank_{rank:05d}.pt")
    marker = {"format": FORMAT, "step": step,
              "distributed_optimizer": is_distributed(actor.optimizer),
              "sharding_metadata": metadata, **_layout(actor)}

    def publish_when_written() -> None:  # every rank, once every rank's tensors are on disk
        coords = [None] * dist.get_world_size()
        dist.all_gather_object(coords, _coords())  # also: every rank's files are on disk
        if rank == 0:
            complete = {**marker, "time": time.time(), "rank_coords": coords,
                        "files": manifest(tmp)}
            write_synced(tmp / COMPLETE_FILE, json.dumps(complete, indent=2))
            publish(tmp, final)
            prune(root, keep_last, final)
            logger.info("saved %s in %.1f s", final, time.perf_counter() - t0)
        dist.barrier()

    if async_queue is None:
        publish_when_written()
    else:
        request.add_finalize_fn(publish_when_written)
        async_queue.schedule_async_request(request)
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
    if marker["distributed_optimizer"] != is_distributed(actor.optimizer):
        raise CheckpointError(
            f"{path} was written with optim.use_distributed_optimizer="
            f"{marker['distributed_optimizer']}; resume with the same setting")

    check_layout_for_format(marker, _layout(actor), is_distributed(actor.optimizer), path)
    trainer_state = _load_file(path / TRAINER_STATE_FILE)
    state = _sharded_state_dict(actor, is_loading=True,
                                metadata=marker.get("sharding_metadata", FULLY_RESHARDABLE))
    loaded = dist_checkpointing.load(state, str(path))
    for key, chunk in zip(_model_keys(actor), actor.model, strict=True):
        chunk.module.load_state_dict(loaded[key])
    load_optimizer(actor.optimizer, loaded["optimizer"])

    scheduler = getattr(actor, "lr_scheduler", None)
    if scheduler is not None:
        if "lr_scheduler" not in trainer_state:
            raise CheckpointError(f"{path} has no LR-scheduler state but the actor has one")
        scheduler.load_state_dict(trainer_state["lr_scheduler"])

    same_layout = all(marker.get(k) == v for k, v in _layout(actor).items())
    source = rank if same_layout else _matching_rank(marker, actor)
    rank_state = _load_file(path / RANKS_SUBDIR / f"rank_{source:05d}.pt", rank_local=True)
    if same_layout:
        set_rng_state(rank_state["rng"])
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
