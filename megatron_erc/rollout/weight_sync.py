"""Trainer -> rollout-engine weight sync in bounded buckets.

``named_tensors`` is consumed lazily (typically a generator that gathers and converts one
Megatron parameter at a time to HF layout), so the sender holds at most one bucket of
converted tensors. The buckets go into one update session of the engine
(``begin_update`` / ``update_weights(bucket)`` / ``finish_update``):

* each bucket is validated (names, shapes, repeats) before it reaches the engine;
* nothing is applied until ``finish_update`` has checked that every weight arrived.

Why commit at the end instead of applying bucket by bucket: vLLM reloads weights layer-wise in
one ``reload_weights`` call (fused QKV / gate-up weights and the CPU backend's oneDNN repacking
need all pieces of a layer), a partial reload "succeeds" with warnings and leaves wrong outputs,
and a failed one is fatal to the engine. So the vLLM engine stages buckets inside its worker
(one model copy on the inference side, none on the trainer side beyond the current bucket) and
reloads once; a missing weight aborts the session with the old weights still serving.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .engine import RolloutEngine


@dataclass
class SyncStats:
    bytes: int
    """Payload bytes sent (sum of tensor sizes as given)."""
    seconds: float
    """Wall time from ``begin_update`` to the end of ``finish_update``."""
    buckets: int
    """Number of ``update_weights`` calls."""

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
) -> SyncStats:
    """Send all weights to ``engine`` in buckets within one update session.

    On any error (a rejected name or shape, a missing weight) the session is aborted, the engine
    keeps its previous weights, and the error propagates.
    """
    start = time.perf_counter()
    total = buckets = 0
    engine.begin_update()
    try:
        for bucket in stream_in_buckets(named_tensors, bucket_bytes):
            engine.update_weights(bucket)
            total += sum(t.numel() * t.element_size() for _, t in bucket)
            buckets += 1
        engine.finish_update()
    except BaseException:
        engine.abort_update()
        raise
    return SyncStats(bytes=total, seconds=time.perf_counter() - start, buckets=buckets)
