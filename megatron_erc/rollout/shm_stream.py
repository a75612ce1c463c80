"""Weights into engine workers in other processes of this host, through shared memory.

The sender (the trainer rank that drives the engine) owns ``SLOTS`` shared-memory buffers and a
local control socket. Per bucket it waits until every worker has released a slot, copies the
bucket's tensors into it (one copy each, straight from the tensors it is given) and sends each
worker a small message: the slot and ``(name, dtype, shape, offset)`` per tensor. A worker's
``receive`` generator yields zero-copy views of the slot to the engine's loader (vLLM's
layer-wise reload) as they arrive. Before it releases a slot, it gives the views the loader
still holds (the first weights of a layer that continues in the next bucket: at most about a
layer) storage of their own, so the sender may overwrite the slot. Engine-side memory in flight
is thus the slots plus at most one layer; nothing stages a whole model.

On a GPU the same protocol would carry CUDA IPC handles of device buffers instead of shared
memory names; that path is not built yet (see the README's weight-sync section).
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import connection, shared_memory

import torch

from .weight_sync import release_views

SLOTS = 2
ALIGN = 64
ACCEPT_TIMEOUT_S = 300.0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShmSender:
    """The trainer side: slots of ``slot_bytes`` (grown when a single tensor is larger)."""

    def __init__(self, slot_bytes: int) -> None:
        self._slots: list[shared_memory.SharedMemory] = []
        self._ensure(slot_bytes)
        self._authkey = os.urandom(16)
        self._dir = tempfile.mkdtemp(prefix="erc-weights-")
        self._address = os.path.join(self._dir, "control")
        self._listener = connection.Listener(self._address, family="AF_UNIX",
                                             authkey=self._authkey)

    def _ensure(self, slot_bytes: int) -> None:
        if self._slots and self._slots[0].size >= slot_bytes:
            return
        self._release_slots()
        self._slots = [shared_memory.SharedMemory(create=True, size=slot_bytes)
                       for _ in range(SLOTS)]

    @property
    def slot_bytes(self) -> int:
        return self._slots[0].size

    def spec(self) -> dict:
        """What a worker needs to attach (plain data: it crosses vLLM's RPC)."""
        return {"address": self._address, "authkey": self._authkey,
                "slots": [s.name for s in self._slots]}

    def stream(self, pairs: Iterable[tuple[str, torch.Tensor]], workers: int,
               rpc: Callable[[dict], object]) -> None:
        """Send ``pairs`` to ``workers`` worker processes; ``rpc(spec)`` is the blocking call
        that makes every worker run ``receive(spec)`` (run here on a thread); a tensor larger
        than a slot is an error. Raises the workers' error, or the sender's own (the workers
        are then told to stop)."""
        done: dict = {}

        def call() -> None:
            try:
                done["value"] = rpc(self.spec())
            except BaseException as e:  # noqa: BLE001 - re-raised on the sending thread
                done["error"] = e

        thread = threading.Thread(target=call, name="erc-weight-rpc", daemon=True)
        thread.start()
        conns: list[connection.Connection] = []
        try:
            conns = [self._accept(thread, done) for _ in range(workers)]
            held = [set() for _ in range(SLOTS)]  # workers still reading each slot
            for i, bucket in enumerate(_aligned_buckets(pairs, self.slot_bytes)):
                slot = i % SLOTS
                while held[slot]:
                    self._wait_release(conns, held, thread, done)
                buf = self._slots[slot].buf
                for _, t, offset in bucket:
                    if t.numel():
                        view = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(),
                                                offset=offset)
                        view.view(t.shape).copy_(t)
                        del view
                items = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset)
                         for name, t, offset in bucket]
                for c in conns:
                    c.send(("bucket", slot, items))
                held[slot] = set(range(len(conns)))
            for c in conns:
                c.send(("end",))
        except BaseException as e:
            for c in conns:
                try:
                    c.send(("abort", f"the sender failed: {e}"))
                except OSError:
                    pass
            thread.join(ACCEPT_TIMEOUT_S)
            raise
        finally:
            thread.join()
            for c in conns:
                c.close()
        if "error" in done:
            raise done["error"]

    def _accept(self, thread: threading.Thread, done: dict) -> connection.Connection:
        # Listener.accept has no timeout: poll the socket so a worker that failed before
        # connecting surfaces its error instead of hanging the sender
        sock = self._listener._listener._socket  # noqa: SLF001 - stdlib has no public poll
        sock.settimeout(1.0)
        waited = 0.0
        while True:
            try:
                return self._listener.accept()
            except (TimeoutError, OSError):
                if not thread.is_alive():
                    raise RuntimeError("the engine's workers ended before taking the weights") \
                        from done.get("error")
                waited += 1.0
                if waited > ACCEPT_TIMEOUT_S:
                    raise TimeoutError("the engine's workers did not connect for the weight "
                                       f"update within {ACCEPT_TIMEOUT_S:.0f} s") from None

    @staticmethod
    def _wait_release(conns, held, thread, done) -> None:
        ready = connection.wait(conns, timeout=5.0)
        if not ready and not thread.is_alive():
            raise RuntimeError("the engine's workers stopped during the weight update") \
                from done.get("error")
        for c in ready:
            try:
                kind, slot = c.recv()
            except EOFError:
                raise RuntimeError("an engine worker closed the weight stream") \
                    from done.get("error")
            if kind == "free":
                held[slot].discard(conns.index(c))

    def _release_slots(self) -> None:
        for s in self._slots:
            s.close()
            s.unlink()
        self._slots = []

    def close(self) -> None:
        self._release_slots()
        self._listener.close()
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


def _aligned_buckets(pairs: Iterable[tuple[str, torch.Tensor]], slot_bytes: int,
                     ) -> Iterator[list[tuple[str, torch.Tensor, int]]]:
    """``(name, tensor, offset)`` runs that fit one slot, each tensor at a 64-byte boundary."""
    bucket, offset = [], 0
    for name, t in pairs:
        if _nbytes(t) > slot_bytes:
            raise ValueError(f"weight update: {name!r} ({_nbytes(t)} bytes) is larger than a "
                             f"transfer slot ({slot_bytes} bytes)")
        if bucket and offset + _nbytes(t) > slot_bytes:
            yield bucket
            bucket, offset = [], 0
        bucket.append((name, t, offset))
        offset = -(-(offset + _nbytes(t)) // ALIGN) * ALIGN
    if bucket:
        yield bucket


def _attach(name: str, cache: dict) -> mmap.mmap:
    """Map the sender's segment (``/dev/shm``) without multiprocessing's resource tracker: the
    sender owns and unlinks it, and a worker may share the sender's tracker or have its own."""
    buf = cache.get(name)
    if buf is None:
        with open(os.path.join("/dev/shm", name.lstrip("/")), "r+b") as f:
            buf = cache[name] = mmap.mmap(f.fileno(), 0)
    return buf


def receive(spec: dict, cache: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The worker side: ``(name, tensor)`` views of the sender's slots, bucket by bucket.
    ``cache`` keeps attached segments across updates (a dict living in the worker)."""
    slots = [_attach(name, cache) for name in spec["slots"]]
    conn = connection.Client(spec["address"], family="AF_UNIX", authkey=spec["authkey"])
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "end":
                return
            if msg[0] == "abort":
                raise RuntimeError(msg[1])
            _, slot, items = msg
            refs = []
            for name, dtype, shape, offset in items:
                dt = getattr(torch, dtype)
                numel = 1
                for d in shape:
                    numel *= d
                t = (torch.frombuffer(slots[slot], dtype=dt, count=numel, offset=offset)
                     .view(shape) if numel else torch.empty(shape, dtype=dt))
                refs.append(weakref.ref(t))
                yield name, t
                del t
            release_views(refs)
            conn.send(("free", slot))
    finally:
        conn.close()
