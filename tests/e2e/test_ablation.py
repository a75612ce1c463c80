"""The ERC ablation runner at its smallest setting: shared warm start, all four variants
(one seed, two RL steps, tiny batches), then the report and its plots; and the study's
module layout (the report reads runs, it does not import the runner)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["rollout.engine=embedded", "rollout.prompts_per_step=4", "rollout.n=4",
        "rollout.max_response_tokens=12", "run.micro_batch_size=8", "run.updates_per_rollout=2",
        "validation.max_prompts=4", "validation.samples_per_prompt=1", "validation.every=2",
        # a random-ish policy rarely answers right: a parity reward keeps groups non-equal
        "rollout.reward_fn=tests.e2e.rewards:parity_reward"]


@pytest.mark.slow
def test_ablation_quick_writes_report(tmp_path):
    out, docs = tmp_path / "ablation", tmp_path / "docs"
    cmd = [sys.executable, "-m", "megatron_erc.studies.ablation", "run", "--quick", "--out",
           str(out), "--steps", "2", "--sft-steps", "5", "--jobs", "2", "--report", str(docs),
           "--set", *TINY, "--sft-set", "batch_size=8", "run.micro_batch_size=8"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    for v in ("dapo", "dapo_erc", "gppo", "gppo_erc"):
        rows = (out / "rl" / v / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3, (v, rows)  # step 0 validation + 2 RL steps
    md = (docs / "ablation.md").read_text()
    for label in ("DAPO", "DAPO+ERC", "GPPO", "GPPO+ERC"):
        assert f"| {label} | 1 |" in md
    assert "entropy fluctuation" in md and "grad-norm spikes" in md
    assert "python -m megatron_erc.studies.ablation run --quick" in md
    for name in ("accuracy", "entropy", "grad_norm", "clip_drop"):
        png = docs / "ablation" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # a second `run` skips finished work
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout


def test_report_does_not_import_the_runner():
    probe = ("import sys, megatron_erc.studies.ablation_report; "
             "print('megatron_erc.studies.ablation' in sys.modules, "
             "'megatron_erc.cli.ablation' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False"]
