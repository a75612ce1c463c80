"""Multi-rank runs through the CLI (torchrun + gloo): sharded validation keeps every rank busy
while it validates, so a collective timeout shorter than validation passes; ``eval`` on two
ranks gives the one-rank accuracy (per-prompt seeds make samples independent of the layout)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

from tests.e2e.test_train import REPO, env, metrics, overrides, task, train  # noqa: F401


def test_collective_timeout_shorter_than_validation_passes(task, tmp_path):  # noqa: F811
    records = [json.loads(x) for x in (task / "data" / "val.jsonl").read_text().splitlines()]
    slow = tmp_path / "slow_val.jsonl"
    slow.write_text("".join(json.dumps({**r, "answer": f"slow:{r['answer']}"}) + "\n"
                            for r in records[:60]))
    run_dir = tmp_path / "timeout"
    # 15 s collective timeout; each rank grades 30 validation answers at 1 s each
    args = [a for a in overrides(task, run_dir, 1) if not a.startswith(
        ("validation.path", "rollout.reward_fn"))] + [
        f"validation.path={slow}", "validation.samples_per_prompt=1", "validation.every=1",
        "rollout.reward_fn=tests.e2e.rewards:slow_validation_reward", "rollout.reward_timeout_s=5",
        "parallel.distributed_timeout_min=0.25"]
    train(args, nproc=2, timeout=400)
    rows = metrics(run_dir)
    assert rows[-1]["step"] == 1 and rows[-1]["val/accuracy"] == 0.0


def _eval(task, nproc: int, tmp_path) -> float:  # noqa: F811
    args = [f"model.path={task / 'init'}", f"model.tokenizer={task / 'tokenizer.model'}",
            f"data.path={task / 'data' / 'train.jsonl'}",
            f"validation.path={task / 'data' / 'val.jsonl'}", "validation.max_prompts=12",
            "validation.samples_per_prompt=2", "validation.temperature=1.0",
            "rollout.engine=embedded", "rollout.max_response_tokens=8",
            "rollout.reward_fn=tests.e2e.rewards:parity_reward", f"run.dir={tmp_path / str(nproc)}"]
    cmd = [sys.executable, "-m", "megatron_erc.cli", "eval", "--config",
           str(REPO / "examples" / "tiny" / "dapo_erc.yaml"), *args]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
                    "-m", "megatron_erc.cli"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return float(re.findall(r"\[eval\] accuracy ([0-9.]+)%", proc.stdout)[0])


def test_eval_on_two_ranks_matches_one_rank(task, tmp_path):  # noqa: F811
    one, two = _eval(task, 1, tmp_path), _eval(task, 2, tmp_path)
    assert 0 < one < 100 and math.isclose(one, two), (one, two)
