"""One error type for the mistakes of the person running a job, and the CLI's handling of it.

``UserError`` covers what they can fix: a config field, a prompt file, the model directory,
a parallel layout that does not fit the model or the world, a checkpoint, a plugin (reward
function). Its message says what is wrong, where (field name, ``file:line``) and what to
do. Every command runs under :func:`run_command`, which prints it once as
``megatron-erc CMD: KIND error: MESSAGE`` (rank 0 only, unless only this rank saw it),
tears down megatron's parallel state and the process group, and returns exit code 2.
Anything else is a bug and keeps its traceback.

No heavy imports here: config and data modules raise these errors at import-light points.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

EXIT_USER_ERROR = 2
KINDS = ("config", "data", "model", "layout", "checkpoint", "plugin")


class UserError(Exception):
    """A mistake in what the job was given; ``kind`` is one of :data:`KINDS`.

    ``rank_local``: only this rank can see the problem (e.g. a file missing on one node), so
    this rank reports it, prefixed with its rank, instead of leaving it to rank 0.
    """

    kind = "input"

    def __init__(self, message: str, *, kind: str | None = None, rank_local: bool = False):
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.rank_local = rank_local


class ConfigError(UserError, ValueError):
    """A config file or override does not fit the config schema."""

    kind = "config"


def current_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from the process group, else from torchrun's environment."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def report(command: str, error: UserError) -> str:
    """Print ``error`` once for the job (stderr) and return the line."""
    rank, world = current_rank()
    prefix = f"[rank {rank}] " if error.rank_local and world > 1 else ""
    line = f"{prefix}megatron-erc {command}: {error.kind} error: {error}"
    if rank == 0 or error.rank_local:
        print(line, file=sys.stderr, flush=True)
    # torchrun's failure summary shows this instead of "To enable traceback see ..."
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    return line


def teardown() -> None:
    """Destroy megatron's parallel state and the default process group, if they exist (so
    no rank is left waiting and torch does not warn about a leaked group at exit)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:
        try:
            ps.destroy_model_parallel()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_command(command: str, fn: Callable[[], int | None]) -> int:
    """``fn()``'s exit code (0 for None); a :class:`UserError` is reported and gives 2."""
    try:
        return fn() or 0
    except UserError as e:
        report(command, e)
        teardown()
        return EXIT_USER_ERROR
