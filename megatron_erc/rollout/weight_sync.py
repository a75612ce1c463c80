"""Trainer -> rollout-engine weight sync: three paths, one protocol (``engine.load_weights``).

``named_tensors`` is consumed lazily (typically a generator that gathers and converts one
Megatron parameter at a time to HF layout), so the sender holds at most one converted tensor
(plus one bucket where buckets exist). The sender declares a manifest first (every name and
shape); the engine refuses a manifest that is not exactly its weights before anything moves.

1. **In process** (the embedded engine; vLLM with its worker in the trainer's process): the
   tensors go straight into the engine's loader, no copy but the load itself.
2. **Worker processes on this host** (vLLM's multiprocessing executor, ``rollout.tp > 1``):
   ``shm_stream``: two shared-memory slots of ``bucket_bytes``, a small message per bucket, the
   worker loads each bucket as it arrives.
3. **Engines on other ranks or nodes** (``broadcast_weights`` / ``receive_broadcast``): buckets
   broadcast over a process group shared by the sender and the engines' ranks (NCCL on GPU,
   gloo on CPU); each bucket is preceded by a one-element status, so a failing sender makes
   the receivers raise instead of waiting in a collective it will never join.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .engine import RolloutEngine

Manifest = Mapping[str, tuple[int, ...]]


@dataclass
class SyncStats:
    bytes: int
    """Payload bytes loaded (sum of tensor sizes as sent)."""
    seconds: float
    """Wall time of the whole update."""

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


def stream_in_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs in order into lists of at most ``bucket_bytes`` bytes.

    A tensor larger than ``bucket_bytes`` travels alone. The input is consumed lazily.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive; got {bucket_bytes}.")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(
    engine: RolloutEngine,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int = 256 << 20,
    manifest: Manifest | None = None,
) -> SyncStats:
    """Stream all weights into ``engine``. ``manifest`` (name -> shape of everything that
    will be sent, in any order) lets the engine refuse a partial or mismatched set before
    anything is loaded; None: ``named_tensors`` is materialised and is its own manifest.
    A refused manifest leaves the engine's weights untouched; a stream that breaks later
    leaves the engine partial (it refuses to generate until a complete update)."""
    start = time.perf_counter()
    if manifest is None:
        named_tensors = list(named_tensors)
        manifest = {n: tuple(t.shape) for n, t in named_tensors}
    nbytes = engine.load_weights(named_tensors, manifest, bucket_bytes)
    return SyncStats(bytes=nbytes, seconds=time.perf_counter() - start)


def release_views(refs: list[weakref.ref]) -> None:
    """Give the tensors among ``refs`` that are still alive (a loader holds them until their
    layer is complete) storage of their own, so the buffer they view can be reused."""
    for ref in refs:
        t = ref()
        if t is not None:
            t.set_(t.clone())


def _plan(manifest: Manifest, element_size: int, bucket_bytes: int):
    """Buckets of ``(name, shape, offset, numel)`` in manifest order; both sides of a broadcast
    compute the same plan from the same manifest."""
    bucket, offset = [], 0
    for name, shape in manifest.items():
        numel = math.prod(shape)
        if bucket and (offset + numel) * element_size > bucket_bytes:
            yield bucket, offset
            bucket, offset = [], 0
        bucket.append((name, tuple(shape), offset, numel))
        offset += numel
    if bucket:
        yield bucket, offset


def broadcast_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], manifest: Manifest,
                      group, src: int, *, dtype: torch.dtype, device, bucket_bytes: int) -> int:
    """The sender (global rank ``src``): ``named_tensors`` in manifest order, cast to ``dtype``,
    broadcast bucket by bucket over ``group``. Returns the bytes sent. A name out of order, a
    wrong shape or an error of the iterator aborts every receiver (and raises here)."""
    it, sent = iter(named_tensors), 0
    status = torch.ones(1, dtype=torch.int64, device=device)
    try:
        for bucket, numel in _plan(manifest, torch.empty((), dtype=dtype).element_size(),
                                   bucket_bytes):
            buf = torch.empty(numel, dtype=dtype, device=device)
            for name, shape, offset, n in bucket:
                got, t = next(it, (None, None))
                if got != name or tuple(t.shape) != shape:
                    raise ValueError(f"weight broadcast: expected {name!r} {shape} next, got "
                                     f"{got!r} {None if t is None else tuple(t.shape)}")
                buf[offset:offset + n].view(shape).copy_(t)
            dist.broadcast(status, src, group=group)
            dist.broadcast(buf, src, group=group)
            sent += buf.numel() * buf.element_size()
    except BaseException:
        status.zero_()
        dist.broadcast(status, src, group=group)
        raise
    return sent


def receive_broadcast(manifest: Manifest, group, src: int, *, dtype: torch.dtype, device,
                      bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A receiver: ``(name, tensor)`` views of each received bucket, for
    ``engine.load_weights``. Raises if the sender aborted."""
    status = torch.empty(1, dtype=torch.int64, device=device)
    for bucket, numel in _plan(manifest, torch.empty((), dtype=dtype).element_size(),
                               bucket_bytes):
        dist.broadcast(status, src, group=group)
        if not int(status.item()):
            raise RuntimeError("weight broadcast: the sender aborted the update")
        buf = torch.empty(numel, dtype=dtype, device=device)
        dist.broadcast(buf, src, group=group)
        for name, shape, offset, n in bucket:
            yield name, buf[offset:offset + n].view(shape)
        del buf  # a fresh buffer per bucket: views a loader still holds stay valid
