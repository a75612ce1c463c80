"""TrainerOffload: offload -> reload is bit-exact and frees the trainer's memory."""

from __future__ import annotations

import functools
import os

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.offload_cases import (
    resident_memory_follows_offload,
    roundtrip_is_bit_exact,
)


def _case(params_dtype: str, params: bool, distributed_optimizer: bool = False) -> dict:
    return {"params_dtype": params_dtype, "params": params,
            "distributed_optimizer": distributed_optimizer}


def _check(case: dict, r: dict) -> None:
    assert r["init"] == [], "the two actors must start from the same weights"
    assert r["after_reload"] == [], f"{case}: changed by offload -> reload: {r['after_reload']}"
    assert r["loss"] == r["loss_ref"], case
    assert r["after_step"] == [], f"{case}: next step differs: {r['after_step']}"
    assert r["after_reload2"] == [], f"{case}: second cycle: {r['after_reload2']}"
    assert r["grads_freed"], case
    # on CPU the bytes went to the spill file, which reload() deletes
    assert r["spill_bytes"] == r["bytes"] and r["spill_bytes_after_reload"] == 0, r
    assert r["params_freed"] == case["params"], case
    kinds = r["bytes_by_kind"]
    assert r["bytes"] == r["bytes2"] == sum(kinds.values()) > 0
    assert (kinds["params"] > 0) == case["params"]
    # Adam's two moments (+ fp32 master copies with bf16 params), this rank's shard only
    # with the distributed optimizer; grads are fp32 (grad_reduce_in_fp32)
    per_grad = (3 if case["params_dtype"] == "bfloat16" else 2) * kinds["grads"]
    if case["distributed_optimizer"]:
        per_grad //= 2  # DP=2
    assert per_grad <= kinds["optimizer"] < per_grad + 4096, (case, kinds)
    assert "offload() called twice" in r["errors"][0]
    assert "reload() called without a preceding offload()" in r["errors"][1]


ONE_RANK_CASES = [_case(dtype, params=p) for dtype in ("float32", "bfloat16")
                  for p in (False, True)]


@functools.cache
def one_rank() -> list[dict]:
    """Both dtypes' round trips in one world (one start, on one xdist worker)."""
    return run_distributed(roundtrip_is_bit_exact, 1, ONE_RANK_CASES)[0]


@pytest.mark.xdist_group("offload_one_rank")
@pytest.mark.parametrize("params_dtype", ["float32", "bfloat16"])
def test_offload_reload_is_bit_exact(params_dtype):
    for case, r in zip(ONE_RANK_CASES, one_rank(), strict=True):
        if case["params_dtype"] == params_dtype:
            _check(case, r)


def test_offload_reload_is_bit_exact_with_dp2_distributed_optimizer():
    cases = [_case("float32", params=False, distributed_optimizer=True),
             _case("bfloat16", params=True, distributed_optimizer=True)]
    for rank_results in run_distributed(roundtrip_is_bit_exact, 2, cases):
        for case, r in zip(cases, rank_results, strict=True):
            _check(case, r)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_resident_memory_drops_by_the_offloaded_bytes_and_comes_back():
    for r in run_distributed(resident_memory_follows_offload, 1)[0]:
        drop = r["rss_before"] - r["rss_offloaded"]
        back = r["rss_reloaded"] - r["rss_offloaded"]
        assert r["bytes"] > 40e6, r  # far above the noise of a few MB
        assert drop >= 0.7 * r["bytes"], r
        assert back >= 0.7 * r["bytes"], r
