"""``slurm/train.sbatch`` against a real slurmctld + slurmd on this machine: a tiny CPU run with
2 ranks at tp=2 to completion; a graceful stop (SIGTERM -> checkpoint -> COMPLETED) and a
resubmission resuming from it; a simulated time limit (USR1) that checkpoints, requeues the
job and finishes the run in the requeued job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "train.sbatch"
JOB_TIMEOUT_S = 900  # a shared 2-core machine: a 3-step job takes ~30 s when quiet

# one cluster per xdist worker; under --dist loadgroup these tests share one
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


def tiny_overrides(task: Path, steps: int, tp: int = 2) -> list[str]:
    return [f"model.path={task}/init", f"model.tokenizer={task}/tokenizer.model",
            f"data.path={task}/data/train.jsonl", "validation.path=null",
            f"run.steps={steps}", "rollout.prompts_per_step=4", "rollout.n=4",
            "rollout.max_response_tokens=16", "run.micro_batch_size=16", f"parallel.tp={tp}",
            "rollout.engine=embedded",
            # random-init responses all score 0 under math grading: vary the reward so
            # dynamic sampling keeps groups and every step updates
            "rollout.reward_fn=tests.slurm.rewards:length_reward"]


def submit(cluster, run_dir: Path, overrides: list[str], nodes: int = 1,
           ranks_per_node: int = 2) -> str:
    env = {**cluster.env, "PYTHONPATH": str(REPO), "MEGATRON_ERC_VENV": str(REPO / ".venv"),
           "MEGATRON_ERC_RUN_DIR": str(run_dir),
           "MEGATRON_ERC_NPROC_PER_NODE": str(ranks_per_node), "OMP_NUM_THREADS": "1"}
    out = run_dir.parent / f"{run_dir.name}-%j.out"
    res = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", f"--output={out}",
                          f"--chdir={REPO}", str(SBATCH), "examples/tiny/dapo_erc.yaml",
                          *overrides], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_info(cluster, job: str) -> dict[str, str]:
    text = cluster.run("scontrol", "show", "job", "-o", job)
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def wait_job(cluster, job: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job_info(cluster, job)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            return info
        time.sleep(2)
    cluster.run("scancel", job, check=False)
    raise AssertionError(f"job {job} not finished after {timeout_s:.0f} s: {info}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a row being written right now
            pass
    return rows


def wait_steps(cluster, job: str, run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if len([r for r in metrics(run_dir) if "step" in r]) >= steps:
            return
        state = job_info(cluster, job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job} ended early: {state}\n" \
                                                f"{logs(run_dir, job)}"
        time.sleep(1)
    raise AssertionError(f"no {steps} steps in {JOB_TIMEOUT_S} s\n{logs(run_dir, job)}")


def logs(run_dir: Path, job: str) -> str:
    files = [run_dir.parent / f"{run_dir.name}-{job}.out",
             *sorted((run_dir / "logs").glob(f"slurm-{job}-node*.log"))]
    return "\n".join(f"--- {f}\n{f.read_text()[-3000:]}" for f in files if f.exists())


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step_"))
                  for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))


def assert_completed(info: dict, run_dir: Path, job: str) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs(run_dir, job)


def test_sbatch_trains_to_completion(slurm_cluster, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, run_dir, tiny_overrides(tiny_task, steps=3))
    info = wait_job(slurm_cluster, job)
    assert_completed(info, run_dir, job)
    assert [r["step"] for r in metrics(run_dir) if "step" in r] == [1, 2, 3]
    assert checkpoints(run_dir) == [3]  # saved at exit
    out = logs(run_dir, job)
    assert "1 node(s) x 2 rank(s)" in out and "world=2, tp=2" in out


def test_sigterm_checkpoints_and_resubmission_resumes(slurm_cluster, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_task, steps=200) + ["checkpoint.every=0"]
    job = submit(slurm_cluster, run_dir, overrides)
    wait_steps(slurm_cluster, job, run_dir, 2)
    slurm_cluster.run("scancel", "--batch", "--signal=TERM", job)
    info = wait_job(slurm_cluster, job)
    assert_completed(info, run_dir, job)
    (stopped_at,) = checkpoints(run_dir)
    assert 2 <= stopped_at < 200
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped_at + 1))

    overrides = tiny_overrides(tiny_task, steps=stopped_at + 2) + ["checkpoint.every=0"]
    job2 = submit(slurm_cluster, run_dir, overrides)
    info = wait_job(slurm_cluster, job2)
    assert_completed(info, run_dir, job2)
    assert f"[train] resumed from step {stopped_at}" in logs(run_dir, job2)
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, stopped_at + 3)), "second run must start at step K+1"
    assert checkpoints(run_dir)[-1] == stopped_at + 2


def test_time_limit_checkpoints_requeues_and_continues(slurm_cluster, tiny_task, tmp_path):
    """Slurm's ``--signal=B:USR1@lead`` warning, sent by hand: the job checkpoints, requeues
    itself under the same id and the requeued run finishes from that checkpoint."""
    run_dir = tmp_path / "run"
    steps = 12
    job = submit(slurm_cluster, run_dir, tiny_overrides(tiny_task, steps=steps))
    wait_steps(slurm_cluster, job, run_dir, 2)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while int(job_info(slurm_cluster, job)["Restarts"]) < 1:
        assert time.monotonic() < deadline, logs(run_dir, job)
        time.sleep(1)
    # A requeued job waits ~2 minutes before it is eligible again; not worth waiting for here.
    # But not zero either: started within a second of the requeue, slurmctld kills it ("Job
    # credential revoked") because the old run's credential is still being revoked.
    time.sleep(10)
    while "(restart 1)" not in logs(run_dir, job):
        assert time.monotonic() < deadline, logs(run_dir, job)
        if job_info(slurm_cluster, job)["JobState"] == "PENDING":
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now",
                              check=False)
        time.sleep(2)
    info = wait_job(slurm_cluster, job)
    assert_completed(info, run_dir, job)
    out = logs(run_dir, job)
    resumed = re.search(r"\[train\] resumed from step (\d+)", out)
    assert resumed and "requeueing job" in out, out
    k = int(resumed.group(1))
    assert 2 <= k < steps
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, steps + 1))
    assert checkpoints(run_dir)[-1] == steps
    assert os.path.getsize(run_dir / "logs" / f"slurm-{job}-node0.log") > 0
