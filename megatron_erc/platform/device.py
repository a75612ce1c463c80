"""Pick the device and the collective backend once per process."""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class Platform:
    """Where this process computes and how it talks to its peers."""

    device_type: str
    """``"cuda"`` or ``"cpu"``."""
    backend: str
    """torch.distributed backend: ``"nccl"`` with CUDA, ``"gloo"`` otherwise."""

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"


@functools.lru_cache(maxsize=1)
def detect() -> Platform:
    """CUDA + NCCL when ``torch.cuda.is_available()``, else CPU + gloo.

    Read once per process and cached: the CPU layer makes CUDA queries answer for the CPU,
    so asking again later would not mean the same thing.
    """
    if torch.cuda.is_available():
        return Platform(device_type="cuda", backend="nccl")
    return Platform(device_type="cpu", backend="gloo")


def setup() -> Platform:
    """Detect the platform and, on CPU only, apply the megatron-core CPU layer (idempotent)."""
    platform = detect()
    if platform.is_cpu:
        from megatron_erc.platform import cpu_megatron

        cpu_megatron.apply()
    return platform
