"""Move the trainer's memory off the device while a colocated engine generates, and back.

Colocated RL (trainer and rollout engine on the same GPUs) needs the trainer's gradient
buffers and optimizer state out of device memory during generation; the parameters may stay
(the weight sync reads them) or go too. ``TrainerOffload(actor).offload()`` moves

- the gradient buffers of every DDP chunk (``buffers`` and ``expert_parallel_buffers``,
  ``grad_data``; ``param.main_grad`` and the bucket views alias them),
- the optimizer state: Adam's ``exp_avg``/``exp_avg_sq`` and, with bf16 parameters, the fp32
  master copies of the mixed-precision optimizer (whole or, with megatron's distributed
  optimizer, this rank's shard),
- with ``params=True`` also the parameters (``param_data`` buffers of DDP, or the parameters
  themselves when DDP keeps none).

It works on storages, not tensors, as verl's ``offload_megatron_model_to_cpu`` and megatron's
``offload_grad_buffers`` do: each distinct storage is copied out and then freed with
``untyped_storage().resize_(0)``; ``reload()`` resizes the same storage object back and copies
the bytes in. Every view (``main_grad``, bucket views, optimizer shards, ``param.grad``)
references the storage object rather than an address, so all of them are valid again after
``reload()`` and hold bit-identical values. Nothing is re-created and no tensor is re-bound,
so the optimizer, DDP and the model need not know an offload happened. Storages are found by
walking the model, DDP buffers and the optimizer, and deduplicated by address.

Where the bytes go:

- CUDA: one pinned host buffer, kept for the next offload (pinned allocation is slow; the
  host memory stays reserved between offloads), filled with non-blocking copies; the stream
  is synchronised before the device storages are freed and again after the reload copies, and
  the caching allocator's free blocks are returned (``torch.cuda.empty_cache``) so a second
  process (the engine) can use them. (This path has not yet run on a GPU; the tests run the
  CPU path, which shares the collection of storages and the resize trick.)
- CPU (no CUDA): the "device" is host memory, so a copy to host memory would free nothing.
  The bytes are written to a spill file in a temporary directory (``spill_dir``, else
  ``$TMPDIR``), the storages are freed and glibc is asked to hand freed heap pages back to
  the OS (``malloc_trim``), so the process's resident memory drops by about the offloaded
  bytes; ``reload()`` reads the file back and deletes it. The file's pages sit in the kernel's
  page cache (reclaimable, not counted in the process's RSS); if the temporary directory is
  a tmpfs the bytes stay in RAM as shared memory and the machine saves nothing. This path
  exists so the same lifecycle runs, and is tested, on CPU; it is not a speed-up.

Between ``offload()`` and ``reload()`` the offloaded tensors have no memory: no forward,
backward, optimizer step, checkpoint or (with ``params=True``) weight sync may touch them.
"""

from __future__ import annotations

import ctypes
import os
import tempfile

import torch

from megatron_erc.trainer.actor import torch_optimizers

KINDS = ("grads", "optimizer", "params")


class TrainerOffload:
    """Offload / reload an ``Actor``'s gradient buffers, optimizer state and optionally its
    parameters (see the module docstring for what moves where).

    Call ``offload()`` after ``actor.step()`` (and after anything that reads the gradients,
    such as the grad norm) and before the engine allocates memory; call ``reload()`` before
    the next ``actor.forward_backward``. The storages are collected at each ``offload()``, so
    optimizer state that appears at the first step is included from then on.
    """

    def __init__(self, actor, params: bool = False, *, spill_dir: str | None = None,
                 kinds: tuple[str, ...] | None = None, trim_host: bool = True):
        self.actor = actor
        self.kinds = kinds or tuple(k for k in KINDS if k != "params" or params)
        """What moves: a subset of ``KINDS`` (default: grads and optimizer, plus params if
        ``params``). Two instances with disjoint kinds can offload in two phases."""
        self.trim_host = trim_host
        """CPU only: return freed heap pages to the OS after offloading (``malloc_trim``), so
        the resident memory really drops. It drops *every* free heap page of the process,
        which are then faulted back in when reused (made the demo's steps 1.4x slower here);
        without it glibc keeps the freed storages for the process's next allocations."""
        if set(self.kinds) - set(KINDS):
            raise ValueError(f"kinds must be a subset of {KINDS}, got {self.kinds}")
        self.spill_dir = spill_dir
        self.device = actor.device
        self.bytes_by_kind: dict[str, int] = dict.fromkeys(KINDS, 0)
        """Bytes moved by the last ``offload()``, per kind (``params`` is 0 unless moved)."""
        self._moved: list[tuple[torch.UntypedStorage, int]] | None = None
        self._pinned: torch.Tensor | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def offloaded(self) -> bool:
        return self._moved is not None

    def offload(self) -> int:
        """Move the state off the device; returns the bytes moved (all kinds together)."""
        if self.offloaded:
            raise RuntimeError("TrainerOffload.offload() called twice: the trainer state is "
                               "already off the device; call reload() before offloading again")
        by_kind = self._collect()
        moved = [s for kind in self.kinds for s in by_kind[kind]]
        fixed = [s for s in moved if not s.resizable()]
        if fixed:
            raise RuntimeError(f"{len(fixed)} trainer storage(s) cannot be resized (memory-mapped "
                               "or borrowed from numpy?), so they cannot be freed; load state "
                               "into ordinary tensors before using TrainerOffload")
        sizes = [s.nbytes() for s in moved]
        bytes_by_kind = {k: sum(s.nbytes() for s in by_kind[k]) if k in self.kinds
                         else 0 for k in KINDS}
        # Copy everything out before freeing anything: a failed copy leaves the state intact.
        if self.device.type == "cuda":
            self._copy_to_pinned(moved, sizes)
        else:
            self._write_spill(moved)
        for s in moved:
            s.resize_(0)
        _release_free_memory(self.device, self.trim_host)
        self._moved = list(zip(moved, sizes, strict=True))
        self.bytes_by_kind = bytes_by_kind
        return sum(sizes)

    def reload(self) -> None:
        """Bring the offloaded state back, bit-identical, into the same storages."""
        if not self.offloaded:
            raise RuntimeError("TrainerOffload.reload() called without a preceding offload(): "
                               "the trainer state is already on the device")
        moved = self._moved
        for s, n in moved:
            s.resize_(n)
        if self.device.type == "cuda":
            offset = 0
            for s, n in moved:
                _bytes(s).copy_(self._pinned[offset:offset + n], non_blocking=True)
                offset += n
            torch.cuda.synchronize(self.device)
        else:
            self._read_spill(moved)
        self._moved = None

    def close(self) -> None:
        """Release the pinned host buffer and remove the spill directory (the state must be
        on the device: closing while offloaded would lose it)."""
        if self.offloaded:
            raise RuntimeError("TrainerOffload.close() while offloaded would lose the trainer "
                               "state; call reload() first")
        self._pinned = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _collect(self) -> dict[str, list[torch.UntypedStorage]]:
        """Distinct non-empty storages on the device, by kind. A storage belongs to the first
        kind that reaches it, parameters first: megatron's fp32 optimizer steps the model
        parameters themselves and the distributed optimizer's fp32 shards are views of
        ``param_data``, so those are parameters, not optimizer state; ``param.grad`` of the
        optimizer's parameters aliases ``main_grad``."""
        seen: set[int] = set()
        out: dict[str, list[torch.UntypedStorage]] = {k: [] for k in KINDS}

        def add(kind: str, t) -> None:
            if not isinstance(t, torch.Tensor):
                return
            s = t.untyped_storage()
            if s.device != self.device or s.nbytes() == 0 or s.data_ptr() in seen:
                return
            seen.add(s.data_ptr())
            out[kind].append(s)

        for chunk in self.actor.model:
            for buf in _ddp_buffers(chunk):
                add("params", buf.param_data)
            for p in chunk.parameters():
                add("params", p)
        for chunk in self.actor.model:
            for buf in _ddp_buffers(chunk):
                add("grads", buf.grad_data)
            for p in chunk.parameters():
                add("grads", getattr(p, "main_grad", None))
        for inner in torch_optimizers(self.actor.optimizer):
            for group in inner.param_groups:
                for p in group["params"]:
                    add("optimizer", p)
                    add("optimizer", p.grad)
            for state in inner.state.values():
                for v in state.values():
                    add("optimizer", v)
        return out

    def _copy_to_pinned(self, moved, sizes) -> None:
        total = sum(sizes)
        if self._pinned is None or self._pinned.numel() != total:
            self._pinned = None
            self._pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        offset = 0
        for s, n in zip(moved, sizes, strict=True):
            self._pinned[offset:offset + n].copy_(_bytes(s), non_blocking=True)
            offset += n
        torch.cuda.synchronize(self.device)

    def _spill_path(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="erc-offload-", dir=self.spill_dir)
        return os.path.join(self._tmp.name, "trainer_state.bin")

    def _write_spill(self, moved) -> None:
        path = self._spill_path()
        try:
            with open(path, "wb") as f:
                for s in moved:
                    f.write(_host_memory(s))
        except BaseException:
            if os.path.exists(path):
                os.remove(path)
            raise

    def _read_spill(self, moved) -> None:
        path = self._spill_path()
        with open(path, "rb") as f:
            for s, n in moved:
                got = f.readinto(_host_memory(s))
                if got != n:
                    raise RuntimeError(f"offload spill file {path} is truncated: read {got} of "
                                       f"{n} bytes")
        os.remove(path)


def _bytes(s: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage (dtype-agnostic, bit-exact copies)."""
    return torch.empty(0, dtype=torch.uint8, device=s.device).set_(s, 0, (s.nbytes(),), (1,))


def _host_memory(s: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage as a buffer for file I/O. Not ``Tensor.numpy()``: exporting
    to numpy marks the storage non-resizable for good, and it could never be freed again."""
    return memoryview((ctypes.c_char * s.nbytes()).from_address(s.data_ptr())).cast("B")


def _ddp_buffers(chunk) -> list:
    """megatron DDP's param-and-grad buffers (``buffers`` is an ``nn.Module`` method on
    anything that is not megatron's DDP, hence the type check)."""
    out = []
    for name in ("buffers", "expert_parallel_buffers"):
        bufs = getattr(chunk, name, None)
        if isinstance(bufs, (list, tuple)):
            out.extend(bufs)
    return out


def _release_free_memory(device: torch.device, trim_host: bool) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    if not trim_host:
        return
    # glibc keeps freed heap pages mapped (optimizer state is many mid-sized tensors);
    # without the trim the resident memory of the test model dropped by a third of the bytes.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
