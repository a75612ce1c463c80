"""check_engine_memory: a memory share the device cannot meet stops with an actionable message."""

from __future__ import annotations

import pytest
import torch

from megatron_erc.rollout.memory import GIB, check_engine_memory


def _info(free_gib: float, total_gib: float = 80.0):
    return lambda: (int(free_gib * GIB), int(total_gib * GIB))


def test_enough_free_memory_passes():
    check_engine_memory(0.5, mem_get_info=_info(40.0))   # exactly the share
    check_engine_memory(0.5, mem_get_info=_info(79.0))
    check_engine_memory(1.0, mem_get_info=_info(80.0))


def test_too_little_free_memory_names_the_field_the_numbers_and_the_fixes():
    with pytest.raises(ValueError) as e:
        check_engine_memory(0.6, device_index=3, mem_get_info=_info(30.0))
    msg = str(e.value)
    assert "rollout.gpu_memory_utilization=0.6" in msg
    assert "48.0 GiB" in msg and "of device 3" in msg   # requested: 0.6 x 80
    assert "30.0 GiB" in msg and "80.0 GiB total" in msg
    assert "at most 0.37" in msg                        # floor(30 / 80, 2 decimals)
    assert "rollout.colocate=true" in msg


def test_suggested_fraction_would_pass():
    free_total = _info(29.99, 79.1)
    with pytest.raises(ValueError) as e:
        check_engine_memory(0.9, mem_get_info=free_total)
    suggested = float(str(e.value).split("at most ")[1].split(",")[0])
    check_engine_memory(suggested, mem_get_info=free_total)


def test_nothing_free_suggests_no_fraction():
    with pytest.raises(ValueError) as e:
        check_engine_memory(0.5, mem_get_info=_info(0.1))
    assert "at most" not in str(e.value) and "rollout.colocate=true" in str(e.value)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_fraction_outside_zero_one_is_rejected(fraction):
    with pytest.raises(ValueError, match=r"rollout.gpu_memory_utilization must be in \(0, 1\]"):
        check_engine_memory(fraction, mem_get_info=_info(80.0))


def test_no_op_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda *a: pytest.fail("must not query device memory without CUDA"))
    check_engine_memory(0.9)
    with pytest.raises(ValueError):  # the fraction is still validated
        check_engine_memory(1.5)


def test_queries_the_given_cuda_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda i: asked.append(i) or (10 * GIB, 80 * GIB))
    with pytest.raises(ValueError, match="of device 2"):
        check_engine_memory(0.5, device_index=2)
    assert asked == [2]
