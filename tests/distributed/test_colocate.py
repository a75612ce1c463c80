"""The colocated memory lifecycle in the real RL loop: the per-step order of phases, the
trainer's memory leaving during generation, and a run with offload/reload every step equal
bit for bit to one that never offloads."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.rl_cases import rl_run

STEP1 = ["offload", "wake_up:weights", "wake_up:kv_cache", "generate", "sleep", "reload",
         "step", "step"]  # the engine already holds the initial weights: no sync
STEP2 = ["offload", "wake_up:weights", "sync", "wake_up:kv_cache", "generate", "sleep",
         "reload", "step", "step"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from megatron_erc.cli.demo import prepare

    root = tmp_path_factory.mktemp("task")
    prepare(root, seed=0)
    return str(root)


def test_colocated_steps_run_in_order_free_memory_and_match_a_resident_run(task, tmp_path):
    common = ["run.steps=2", "rollout.max_gen_batches=1", "rollout.cpu_trim_memory=true"]
    on, off, params = run_distributed(rl_run, 1, task, [
        (str(tmp_path / "on"), common + ["rollout.colocate=true"]),
        (str(tmp_path / "off"), common + ["rollout.colocate=false"]),
        (str(tmp_path / "params"), common + ["rollout.offload_params=true"])], timeout=600)[0]
    assert on["events"] == ["sleep"] + STEP1 + STEP2, on["events"]
    assert off["events"] == ["sleep", "wake_up:weights", "wake_up:kv_cache", "generate",
                             "sleep", "step", "step", "wake_up:weights", "sync",
                             "wake_up:kv_cache", "generate", "sleep", "step", "step"]
    # parameters leave after the sync (which reads them)
    assert params["events"] == ["sleep"] + [e for s in (STEP1, STEP2) for e in s[:s.index(
        "wake_up:kv_cache")] + ["offload_params"] + s[s.index("wake_up:kv_cache"):]], \
        params["events"]
    for a, b in zip(on["history"], off["history"], strict=True):  # offload/reload is exact
        for k in ("loss", "grad_norm", "kl/approx", "erc/dropped_frac"):
            assert a[k] == b[k], (k, a[k], b[k])
    # step 2 moves gradients and Adam state; the process's resident memory drops by it
    step2 = on["history"][1]
    assert step2["memory/offloaded_gib"] > 5 / 1024  # MiB: tiny model grads + Adam moments
    assert step2["memory/trainer_freed_gib"] >= 0.7 * step2["memory/offloaded_gib"], step2
    p2 = params["history"][1]
    assert p2["memory/offloaded_gib"] > step2["memory/offloaded_gib"]
    assert params["history"][1]["loss"] == on["history"][1]["loss"]
