"""Run a function on N ranks: the ranks of the current ``torchrun`` launch, or fresh
processes spawned here that meet through a file store (no port to pick)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_erc.platform.device import detect
from megatron_erc.platform.distributed import init_process_group


class RankFailure(RuntimeError):
    """A rank raised or died; the message names it and says why."""


def _worker(fn: Callable, rank: int, world: int, store_path: str, args: tuple, results,
            expected: tuple[type[BaseException], ...]) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        platform = detect()
        if platform.backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world)
        dist.init_process_group(platform.backend, store=store, rank=rank, world_size=world)
        fn(*args)
        results.put((rank, None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((rank, str(e) if isinstance(e, expected) else traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state  # only if the function used megatron

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args,
              expected: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``fn(*args)`` on ``world`` ranks: the current ones under torchrun (its exceptions
    propagate), else fresh spawned processes. A spawned rank's failure raises
    ``RankFailure`` with the exception's message for the ``expected`` types, the traceback
    for any other."""
    if "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world:
            raise RankFailure(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']}, but this "
                              f"needs {world} ranks")
        init_process_group()
        fn(*args)
        return
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="erc-ranks-") as tmp:
        procs = [ctx.Process(target=_worker,
                             args=(fn, r, world, f"{tmp}/store", args, results, expected))
                 for r in range(world)]
        for p in procs:
            p.start()
        failure = None
        try:
            for _ in range(world):
                while True:
                    try:
                        rank, err = results.get(timeout=5)
                        break
                    except queue.Empty:
                        dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                        if dead:
                            raise RankFailure(f"rank {dead[0]} died (exit code "
                                              f"{procs[dead[0]].exitcode})") from None
                if err is not None:
                    failure = f"rank {rank}: {err}"
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if failure else 60)
                if p.is_alive():
                    p.kill()
                    p.join()
        if failure:
            raise RankFailure(failure)
