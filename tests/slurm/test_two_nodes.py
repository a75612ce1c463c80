"""``slurm/train.sbatch`` on two nodes (network namespaces of this machine, see
``two_nodes.py``), one rank per node: data parallelism across the nodes, a graceful stop of the
two-node job that checkpoints, a resubmission with tensor parallelism across the nodes that
resumes from it (a layout change); the same stop with vLLM engines, whose processes must keep
serving until the trainer has saved; and a node whose job processes are SIGKILLed: the job
fails instead of hanging, and the next submission resumes from the last complete
checkpoint."""

from __future__ import annotations

import time

import pytest

from tests.slurm.test_sbatch import (
    assert_completed,
    checkpoints,
    logs,
    metrics,
    submit,
    tiny_overrides,
    wait_job,
    wait_steps,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


def test_dp_across_nodes_stops_and_resumes_with_tp_across_nodes(two_nodes, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    dp = tiny_overrides(tiny_task, steps=200, tp=1) + ["checkpoint.every=0"]
    job = submit(two_nodes, run_dir, dp, nodes=2, ranks_per_node=1)
    wait_steps(two_nodes, job, run_dir, 2)
    out = logs(run_dir, job)
    assert "2 node(s) x 1 rank(s)" in out and "world=2, tp=1" in out, out
    two_nodes.run("scancel", "--batch", "--signal=TERM", job)
    info = wait_job(two_nodes, job)
    assert_completed(info, run_dir, job)  # both nodes saw the checkpoint published
    (k,) = checkpoints(run_dir)
    assert 2 <= k < 200

    tp = tiny_overrides(tiny_task, steps=k + 2, tp=2) + ["checkpoint.every=0"]
    job2 = submit(two_nodes, run_dir, tp, nodes=2, ranks_per_node=1)
    info = wait_job(two_nodes, job2)
    assert_completed(info, run_dir, job2)
    out = logs(run_dir, job2)
    assert f"[train] resumed from step {k}" in out and "world=2, tp=2" in out, out
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, k + 3))
    assert checkpoints(run_dir)[-1] == k + 2


def test_a_killed_node_fails_the_job_and_the_next_one_resumes(two_nodes, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    timeout_min = 0.5  # the collective timeout: the job must not outlive it by much
    overrides = tiny_overrides(tiny_task, steps=200, tp=1) + [
        "checkpoint.every=1", "checkpoint.async_save=true",  # saves in flight when killed
        f"parallel.distributed_timeout_min={timeout_min}"]
    job = submit(two_nodes, run_dir, overrides, nodes=2, ranks_per_node=1)
    wait_steps(two_nodes, job, run_dir, 3)
    assert two_nodes.kill_node_jobs("node1") > 0
    killed_at = time.monotonic()
    info = wait_job(two_nodes, job, timeout_s=600)
    assert info["JobState"] == "FAILED", (info["JobState"], logs(run_dir, job))
    assert time.monotonic() - killed_at < timeout_min * 60 + 120, "the job hung"
    last = checkpoints(run_dir)[-1]
    assert last >= 2

    job2 = submit(two_nodes, run_dir, tiny_overrides(tiny_task, steps=last + 1, tp=1),
                  nodes=2, ranks_per_node=1)
    info = wait_job(two_nodes, job2)
    assert_completed(info, run_dir, job2)
    assert f"[train] resumed from step {last}" in logs(run_dir, job2)
    assert [r["step"] for r in metrics(run_dir)][-1] == last + 1


def test_a_stop_with_vllm_engines_saves(two_nodes, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_task, steps=200, tp=1) + [
        "checkpoint.every=0", "rollout.engine=vllm", "rollout.vllm_kv_cache_mb=64"]
    job = submit(two_nodes, run_dir, overrides, nodes=2, ranks_per_node=1)
    wait_steps(two_nodes, job, run_dir, 1)
    two_nodes.run("scancel", "--batch", "--signal=TERM", job)
    info = wait_job(two_nodes, job)
    assert_completed(info, run_dir, job)
    out = logs(run_dir, job)
    assert "engine=vllm" in out, out
    (k,) = checkpoints(run_dir)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, k + 1))
