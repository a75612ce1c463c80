"""Rank function for the activation-recompute tests (spawned by the harness).

One world builds the tiny model once per recompute setting with the same weights, runs one
training step through megatron-core's DDP and schedule, and reports, per setting: the loss,
every local gradient, and two activation-memory measures:

- ``saved_bytes``: bytes of the distinct non-parameter storages autograd saves for backward
  during the forward (``torch.autograd.graph.saved_tensors_hooks``): what the step holds
  between forward and backward;
- ``peak_bytes``: the high-water mark of the bytes allocated by torch ops over forward +
  backward and not yet freed (``LiveBytes``), so the activations recomputed in backward
  count too.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

SEQ_LEN = 256
MICRO_BATCH_SIZE = 2


def _hf_config(hf_dict: dict):
    from transformers import AutoConfig

    d = dict(hf_dict)
    return AutoConfig.for_model(d.pop("model_type"), **d)


class SavedBytes:
    """Counts the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, params):
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class LiveBytes(TorchDispatchMode):
    """High-water mark of the bytes held by storages that torch ops create while the mode is
    active, each counted from the op that allocates it until it is freed.

    Frees are seen through a finalizer on the storage, so one made on another thread (a
    gloo work object can drop the last reference to a tensor) counts too; the profiler's
    allocator events miss those. Outputs that share an input's storage (in-place ops,
    views, ``out=``) allocate nothing and are skipped.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()
        self._lock = threading.Lock()

    def _freed(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            self._tracked.discard(ptr)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            with self._lock:
                if ptr == 0 or ptr in inputs or ptr in self._tracked:
                    continue
                self._tracked.add(ptr)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr, nbytes)
        return out


def run_recompute(rank: int, world: int, hf_dict: dict, settings: dict[str, dict]) -> dict:
    """One step per entry of ``settings`` (name -> ``ParallelConfig`` recompute fields) at
    TP=``world``; weights of the first setting are copied into the others."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig, build_model_chunks

    platform.setup()
    platform.init_model_parallel(world, 1, seed=1234)
    hf_config = _hf_config(hf_dict)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hf_config.vocab_size, (MICRO_BATCH_SIZE, SEQ_LEN), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(SEQ_LEN).expand(MICRO_BATCH_SIZE, SEQ_LEN)

    weights = None
    out = {"tp_rank": ps.get_tensor_model_parallel_rank()}
    for name, fields in settings.items():
        parallel = ParallelConfig(tp=world, pad_vocab_multiple=1, **fields)
        (chunk,) = build_model_chunks(hf_config, parallel)
        if weights is None:
            weights = {n: p.detach().clone() for n, p in chunk.named_parameters()}
        with torch.no_grad():
            for n, p in chunk.named_parameters():
                p.copy_(weights[n])
        config = chunk.config
        model = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True), chunk)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = None
        model.train()
        saved = SavedBytes(chunk.parameters())

        def forward_step(data_iterator, model, saved=saved):
            next(data_iterator)
            with saved.hooks():
                loss = model(tokens, positions, None, labels=labels)  # [b, s]

            def loss_func(per_token):
                value = per_token.float().mean()
                return value, {"loss": value.detach().clone()}

            return loss, loss_func

        model.zero_grad_buffer()
        live = LiveBytes()
        with live:
            metrics = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([0]), model=model,
                num_microbatches=1, seq_length=SEQ_LEN, micro_batch_size=MICRO_BATCH_SIZE,
                forward_only=False)
        out[name] = {
            "granularity": config.recompute_granularity,
            "loss": float(metrics[0]["loss"]),
            "grads": {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters()},
            "saved_bytes": saved.total,
            "peak_bytes": live.peak,
        }
    return out
