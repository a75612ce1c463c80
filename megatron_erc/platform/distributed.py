"""Process-group and megatron parallel-state set-up shared by the trainer and the tests."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

from megatron_erc.platform.device import Platform, setup


def init_process_group(platform: Platform | None = None, timeout=None) -> Platform:
    """Initialise the default group from torchrun's environment (or a single rank).

    Single-rank runs need no launcher: without ``WORLD_SIZE`` a one-rank group on a private
    file store is created, so megatron's parallel state works the same everywhere.
    ``timeout`` (a ``datetime.timedelta``) bounds every collective of the group.
    """
    platform = platform or setup()
    if dist.is_initialized():
        return platform
    if platform.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(platform.backend, timeout=timeout)
    else:

        store = dist.FileStore(tempfile.mktemp(prefix="megatron-erc-store-"), 1)
        dist.init_process_group(platform.backend, store=store, rank=0, world_size=1,
                                timeout=timeout)
    return platform


def adapt_parallel_config(config, platform: Platform | None = None):
    """Make a megatron ``ModelParallelConfig`` safe for the platform's backend (in place).

    gloo matches point-to-point messages per peer in send order and ignores op grouping.
    With two pipeline ranks, prev and next are the same peer, so batched send/recv pairs cross
    and the interleaved schedule computes silently wrong activations. Unbatched p2p (megatron
    orders sends and receives by rank parity) is exact.
    """
    platform = platform or setup()
    if platform.backend == "gloo" and config.pipeline_model_parallel_size > 1:
        config.batch_p2p_comm = False
        # megatron accepts overlapped (unbatched, async) p2p only in the interleaved schedule.
        config.overlap_p2p_comm = bool(config.virtual_pipeline_model_parallel_size)
    return config


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, *, seed: int = 1234,
                        **kwargs) -> None:
    """Initialise megatron's parallel state and its RNG tracker over the default group."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, **kwargs)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
