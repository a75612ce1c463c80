"""Run a function on N gloo ranks, each in a fresh process.

The one helper every distributed test uses. Ranks rendezvous through a ``FileStore`` in a
fresh temporary directory (no port races under pytest-xdist), the process group is always
destroyed in ``finally``, and an exception on any rank fails the caller with that rank's
traceback.

Ranks are forked from a server process (``forkserver``) that has imported torch,
megatron-core and transformers once, with nothing initialised: a rank starts as a freshly
spawned one would (the caller's environment and directory, no process group, no megatron
state, megatron-erc not imported, so the CPU platform layer is not applied until the rank
applies it) without paying those imports (about 4 s of CPU per rank). ``run_each`` runs
several rank functions in one world, for tests that would otherwise spawn one world per case.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
# Imported once by the fork server (third-party only: importing them initialises nothing).
PRELOAD = ["torch", "torch.distributed", "numpy", "transformers", "megatron.core",
           "megatron.core.parallel_state", "megatron.core.transformer",
           "megatron.core.models.gpt", "megatron.core.distributed", "megatron.core.optimizer",
           "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing"]


class RankFailed(AssertionError):
    """Raised in the parent when one or more ranks raised; carries their tracebacks."""


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when this process starts its server
    return ctx


def _worker(fn: Callable, rank: int, world_size: int, store_path: str, args: tuple,
            kwargs: dict, results: mp.Queue, threads: int, env: dict, cwd: str) -> None:
    os.environ.clear()  # the caller's environment and directory now, as a spawned process
    os.environ.update(env)  # has them, not the fork server's at its start
    os.chdir(cwd)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    torch.set_num_threads(threads)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *_unpack(args), **_unpack(kwargs))
        results.put((rank, True, _pack(out)))
    except BaseException:  # noqa: BLE001 - the traceback is the whole point
        results.put((rank, False, traceback.format_exc()))
    finally:
        _teardown()


def _pack(obj: Any) -> bytes:
    # Tensors sent through a multiprocessing queue travel as shared-memory handles that die
    # with the sending process; serialise them to bytes instead.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _teardown() -> None:
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # megatron not imported or never initialised
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = DEFAULT_TIMEOUT_S, threads: int = 1,
                    **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    ``fn`` must be importable by name (a module-level function) because ranks are spawned
    fresh. Returns the per-rank return values ordered by rank (they must be picklable).
    Raises ``RankFailed`` with every failing rank's traceback, or on timeout.
    """
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="erc-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, store_path, _pack(args),
                                              _pack(kwargs), results, threads,
                                              dict(os.environ), os.getcwd()), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs: dict[int, Any] = {}
        failures: dict[int, str] = {}
        try:
            for _ in range(world_size):
                try:
                    rank, ok, payload = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(outputs) - set(failures))
                    raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f} s"
                                     + _describe(failures)) from None
                if ok:
                    outputs[rank] = _unpack(payload)
                else:
                    failures[rank] = payload
                if failures:
                    # One rank failed: its peers are likely blocked in a collective.
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if failures else 30)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        if failures:
            raise RankFailed(_describe(failures))
        bad_exit = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (0, None)]
        if bad_exit and len(outputs) < world_size:
            raise RankFailed(f"ranks exited abnormally: {bad_exit}")
        return [outputs[r] for r in range(world_size)]


def _describe(failures: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))


def run_each(rank: int, world_size: int, calls: list[tuple]) -> list[Any]:
    """Rank function running several others in turn in one world: ``calls`` holds
    ``("module:function", args)`` pairs; each gets ``(rank, world_size, *args)``. Megatron's
    parallel state is destroyed after each call, so the next builds its own layout. Returns
    the results in order."""
    import importlib

    out = []
    for target, args in calls:
        module, name = target.split(":")
        out.append(getattr(importlib.import_module(module), name)(rank, world_size, *args))
        _destroy_model_parallel()
    return out


def _destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
