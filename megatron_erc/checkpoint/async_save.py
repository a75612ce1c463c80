"""How the trainer saves: now, or in the background while training goes on
(``checkpoint.async_save``).

An asynchronous save takes a snapshot of this moment (megatron's writer forks: the child
sees the tensors as they were, copy-on-write, while the parent trains on; on GPU the
tensors are first staged to host memory) and writes it from the child. The checkpoint is
published (``COMPLETE`` marker, rename, pruning) when every rank's writer is done, found by
``poll`` at the next step boundary or by ``finish``. At most one save is in flight: a new
one first waits for the previous one. A run that dies meanwhile leaves a temporary
directory that ``resume=auto`` ignores, and the previous checkpoint stays the newest.

Every method is collective (every rank calls it at the same point), except ``abort``.
"""

from __future__ import annotations

import os
import time

from megatron_erc.checkpoint.train import save_checkpoint


class CheckpointSaver:
    """Saves ``actor`` into ``root`` with one set of settings (see ``CheckpointConfig``)."""

    def __init__(self, root: str | os.PathLike, actor, *, keep_last: int, parallel: bool,
                 optimizer_format: str, async_save: bool):
        self.root, self.actor = root, actor
        self.options = {"keep_last": keep_last, "parallel": parallel,
                        "optimizer_format": optimizer_format}
        self.queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue(persistent=False)

    @property
    def pending(self) -> int:
        """Saves started and not yet published."""
        return self.queue.get_num_unfinalized_calls() if self.queue is not None else 0

    def save(self, step: int, extra_state: dict, *, wait: bool = False) -> float:
        """Save ``step``; returns the seconds training was held. ``wait``: return only when
        it is published (a stop or the end of the run)."""
        t0 = time.perf_counter()
        self.finish()  # one save in flight at a time
        save_checkpoint(self.root, step, self.actor, extra_state, async_queue=self.queue,
                        **self.options)
        if wait:
            self.finish()
        return time.perf_counter() - t0

    def poll(self) -> None:
        """Publish a save whose writers are all done (one small all-reduce; no wait)."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Wait for the save in flight and publish it."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def abort(self) -> None:
        """This rank only (an exception is unwinding it): stop its writer, publish nothing."""
        if self.queue is not None:
            for call in self.queue.async_calls:  # megatron's close(abort) spares these
                call.async_caller.close(abort=True)
            self.queue.async_calls.clear()
