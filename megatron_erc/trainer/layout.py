"""Which ranks form which rollout engine, and which share of a global list each engine takes.

Pure functions of integers (no process groups), so the mapping is unit-tested on its own.

The job runs ``world_size / rollout_tp`` engines. Engine ``e`` spans the consecutive global
ranks ``[e * rollout_tp, (e + 1) * rollout_tp)``; its first rank (the *leader*) drives it
(``generate``, weight updates) and its other ranks lend their devices to the engine's
tensor-parallel workers. Consecutive ranks share a node under torchrun and Slurm (ranks are
numbered node by node), so an engine never spans two nodes when ``rollout_tp`` divides the
ranks per node. The trainer's TP/PP/DP layout does not enter: every rank generates, whatever
its model-parallel role, and the engine's tensor parallelism is chosen for inference alone
(e.g. train TP=4 x PP=2, generate with rollout_tp=2).

Example, 16 ranks on 2 nodes, rollout_tp=4: engines 0-1 on node 0 (devices 0-3, 4-7),
engines 2-3 on node 1; rank 9 is engine 2's second rank, on device 1 of node 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSlot:
    """This rank's place in the rollout layout."""

    engine_id: int
    """Index of the engine this rank belongs to, in ``[0, num_engines)``."""
    num_engines: int
    """Engines in the job: ``world_size / rollout_tp``."""
    engine_rank: int
    """Position of this rank inside its engine; 0 is the leader that drives it."""
    ranks: tuple[int, ...]
    """Global ranks spanned by the engine, leader first (``rollout_tp`` of them)."""
    devices: tuple[int, ...]
    """Local device indices of those ranks on their node (the engine's GPUs)."""

    @property
    def is_leader(self) -> bool:
        return self.engine_rank == 0


def engine_slot(global_rank: int, local_rank: int, world_size: int, local_world_size: int,
                rollout_tp: int) -> EngineSlot:
    """The engine of ``global_rank`` (see the module docstring for the layout).

    ``local_rank`` / ``local_world_size``: this rank's index and the rank count on its node
    (torchrun's ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``). Raises ``ValueError`` with what to
    change when ``rollout_tp`` does not divide both the world and the ranks per node.
    """
    if rollout_tp < 1:
        raise ValueError(f"rollout.tp must be >= 1, got {rollout_tp}")
    if not 0 <= global_rank < world_size or not 0 <= local_rank < local_world_size:
        raise ValueError(f"rank {global_rank} (local {local_rank}) is outside a world of "
                         f"{world_size} ({local_world_size} per node)")
    if world_size % rollout_tp:
        raise ValueError(f"rollout.tp={rollout_tp} must divide the number of ranks "
                         f"({world_size}): each engine spans rollout.tp ranks")
    if local_world_size % rollout_tp:
        raise ValueError(f"rollout.tp={rollout_tp} must divide the ranks per node "
                         f"({local_world_size}): an engine's GPUs must share a node")
    engine_rank = global_rank % rollout_tp
    leader = global_rank - engine_rank
    first_device = local_rank - engine_rank
    return EngineSlot(engine_id=global_rank // rollout_tp, num_engines=world_size // rollout_tp,
                      engine_rank=engine_rank, ranks=tuple(range(leader, leader + rollout_tp)),
                      devices=tuple(range(first_device, first_device + rollout_tp)))


def shard(num_items: int, num_shards: int, index: int) -> slice:
    """Contiguous, balanced share ``index`` of ``num_items`` (sizes differ by at most one,
    larger shares first); shares in index order cover ``range(num_items)`` exactly once."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} outside [0, {num_shards})")
    base, extra = divmod(num_items, num_shards)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))
