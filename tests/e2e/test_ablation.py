"""The ERC ablation runner at its smallest setting (``--quick``: DAPO and DAPO+ERC, one seed,
both regimes from one shared warm start, two RL steps, tiny batches), then the report with its
paired tables, generated reading and per-regime plots; and the study's module layout (the
report reads runs, it does not import the runner)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["rollout.engine=embedded", "rollout.prompts_per_step=8", "rollout.n=4",
        "rollout.max_response_tokens=12", "run.micro_batch_size=8",
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

    for regime, updates in (("u2", 2), ("u8", 8)):
        for v in ("dapo", "dapo_erc_095"):
            d = out / "rl" / regime / v / "seed0"
            rows = (d / "metrics.jsonl").read_text().splitlines()
            assert len(rows) == 3, (regime, v, rows)  # step 0 validation + 2 RL steps
            cfg = json.loads((d / "config.json").read_text())
            assert cfg["run"]["updates_per_rollout"] == updates
            assert (cfg["algo"]["erc"] is None) == (v == "dapo")
    assert not (out / "rl" / "u2" / "gppo").exists()  # --quick: two variants only
    md = (docs / "ablation.md").read_text()
    for regime in ("### 2 updates per rollout", "### 8 updates per rollout"):
        assert regime in md
    for label in ("DAPO", "DAPO+ERC 0.95-1.05"):
        assert md.count(f"| {label} | 1 |") == 2  # one row per regime
    assert "entropy fluctuation" in md and "grad-norm spikes" in md
    assert "| DAPO+ERC 0.95-1.05 | +" in md or "| DAPO+ERC 0.95-1.05 | -" in md  # paired
    assert "## Reading (generated from the numbers above)" in md
    assert "too few paired seeds (1)" in md
    assert "python -m megatron_erc.studies.ablation run --quick" in md
    for name in ("u2", "u8"):
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
