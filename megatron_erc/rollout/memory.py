"""Check, before an engine starts, that the device has the memory the engine will ask for.

vLLM reserves ``gpu_memory_utilization`` x total device memory (weights, activations and KV
cache) and refuses to start when less than that is free, with a traceback from deep inside
its worker. ``check_engine_memory`` makes the same comparison first and stops with a message
that names the config field and what to do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_erc.errors import ConfigError  # the CLI prints it without a traceback

GIB = 1024**3


def check_engine_memory(gpu_memory_utilization: float, *, device_index: int = 0,
                        mem_get_info: Callable[[], tuple[int, int]] | None = None) -> None:
    """Raise ``ValueError`` when ``gpu_memory_utilization`` is outside ``(0, 1]``, or
    ``errors.ConfigError`` (a ``ValueError`` the CLI reports in one line) when less than
    ``gpu_memory_utilization * total`` bytes are free on the device.

    ``mem_get_info() -> (free, total)`` bytes defaults to ``torch.cuda.mem_get_info`` of
    ``device_index``; without CUDA and without an injected ``mem_get_info`` only the
    fraction is checked (the CPU engines take no memory share).
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got "
                         f"{gpu_memory_utilization}")
    if mem_get_info is None:

        if not torch.cuda.is_available():
            return
        mem_get_info = lambda: torch.cuda.mem_get_info(device_index)  # noqa: E731
    free, total = mem_get_info()
    wanted = gpu_memory_utilization * total
    if free < wanted:
        fits = _floor2(free / total)
        lower = (f"Lower rollout.gpu_memory_utilization to at most {fits}, or set"
                 if fits > 0 else "Set")
        raise ConfigError(
            f"rollout.gpu_memory_utilization={gpu_memory_utilization} asks the engine for "
            f"{wanted / GIB:.1f} GiB of device {device_index} ({total / GIB:.1f} GiB total), but "
            f"only {free / GIB:.1f} GiB ({free / total:.0%}) is free. {lower} "
            f"rollout.colocate=true so the trainer offloads its gradients and optimizer state "
            f"(and with rollout.offload_params its parameters) before the engine starts, or "
            f"free the memory other processes hold on this device.")


def _floor2(x: float) -> float:
    """Round down to two decimals (a suggestion that would itself pass the check)."""
    return int(x * 100) / 100
