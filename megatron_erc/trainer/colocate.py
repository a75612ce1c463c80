"""The memory phases of a step when trainer and rollout engine share the GPUs.

Every generation (training rollouts and validation) runs inside ``Colocation.rollout(sync)``:

    offload trainer grads + optimizer state  ->  engine wake_up(weights)  ->  weight sync
    ->  [offload parameters, with rollout.offload_params]  ->  engine wake_up(kv_cache)
    ->  generate  ->  engine sleep  ->  trainer reload

so the engine's weights and KV cache are on the device only while the trainer's gradient
buffers and optimizer state (optionally its parameters) are in pinned host memory, and the
other way round. Parameters go after the sync because the sync reads them. The sync runs only
when the weights changed since the engine last received them. Without colocation the same
calls run except offload/reload (engines on separate GPUs keep their memory). On CPU, vLLM has
no sleep mode (its sleep/wake are no-ops) and the trainer's offload goes to a spill file (see
``offload.py``): the order and the bytes are the same as on GPU; the freed storages return to
glibc's heap, and to the OS only with ``rollout.cpu_trim_memory`` (``malloc_trim``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import torch

from megatron_erc.trainer.offload import TrainerOffload

log = logging.getLogger(__name__)


def resident_bytes(device: torch.device) -> int:
    """Memory this process holds on ``device``: allocated CUDA memory, or the resident set
    size (VmRSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Colocation:
    """This rank's phase switching between training and generation (see module docstring).

    Each phase transition passes through ``_note`` by name (``offload``, ``wake_up:weights``,
    ``sync``, ``offload_params``, ``wake_up:kv_cache``, ``sleep``, ``reload``) and is logged
    at debug level: the order that ran, for debugging and for the lifecycle test.
    """

    def __init__(self, actor, engine, *, enabled: bool, offload_params: bool = False,
                 trim_host: bool = False):
        self.actor, self.engine, self.enabled = actor, engine, enabled
        self.stale = False
        """The actor's weights changed since the engine last received them."""
        self._state = TrainerOffload(actor, params=False, trim_host=trim_host) \
            if enabled else None
        self._params = TrainerOffload(actor, kinds=("params",), trim_host=trim_host) \
            if enabled and offload_params else None

    def _note(self, name: str) -> None:
        log.debug("colocation: %s", name)

    def sleep(self) -> None:
        """Engine memory off the device (the trainer is about to use it)."""
        if self.engine is not None and self.enabled:
            self.engine.sleep()
        self._note("sleep")

    @contextlib.contextmanager
    def rollout(self, sync: Callable[[], dict]) -> Iterator[dict]:
        """Generation phase; yields a metrics dict filled with the sync and memory numbers."""
        m: dict = {}
        moved, freed = self._offload(self._state, "offload")
        self._wake("weights")
        if self.stale:
            t0 = time.perf_counter()
            m.update(sync())
            self._note("sync")
            m["time/sync"] = time.perf_counter() - t0
            self.stale = False
        more, freed_more = self._offload(self._params, "offload_params")
        if self.enabled:
            m["memory/offloaded_gib"] = (moved + more) / 2**30
            m["memory/trainer_freed_gib"] = (freed + freed_more) / 2**30
        self._wake("kv_cache")
        try:
            yield m
        finally:
            self.sleep()
            for off in (self._params, self._state):
                if off is not None and off.offloaded:
                    off.reload()
            if self.enabled:
                self._note("reload")

    def _offload(self, off: TrainerOffload | None, name: str) -> tuple[int, int]:
        """``(bytes moved, bytes the process's device memory shrank by)``."""
        if off is None:
            return 0, 0
        before = resident_bytes(self.actor.device)
        moved = off.offload()
        self._note(name)
        return moved, before - resident_bytes(self.actor.device)

    def _wake(self, tag: str) -> None:
        if self.engine is not None and self.enabled:
            self.engine.wake_up(tags=[tag])
        self._note(f"wake_up:{tag}")

    def close(self) -> None:
        for off in (self._params, self._state):
            if off is not None:
                off.close()
