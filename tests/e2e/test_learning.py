"""The embedded default learns: validation accuracy after DAPO+ERC beats the warm start.

This is the README's first command at a shorter RL length (the same code path: prepare,
``megatron-erc sft``, ``megatron-erc train`` with vLLM where installed, dashboard).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.e2e.console import assert_console_contract

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_rl_improves_validation_accuracy(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_erc.cli", "demo", "--out", str(out), "--rl-steps", "40"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2"),
        capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert pathlib.Path(summary["dashboard"]).stat().st_size > 10_000
    assert summary["dashboard"] in proc.stdout
    assert summary["final_accuracy"] > summary["warm_start_accuracy"], summary
    assert_console_contract(proc.stdout + proc.stderr)  # issue 19: <= 100 lines, all ours
