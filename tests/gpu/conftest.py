"""Fixtures of the GPU smoke tests: the smoke module run in a fresh process (CUDA state,
process group and megatron's parallel state never leak into the pytest process)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def run_smoke(tmp_path):
    """``run_smoke(*args, timeout=...)`` -> the JSON result of ``python -m tests.gpu.smoke``;
    fails with the output tail when the module exits non-zero."""

    def run(*args: str, timeout: float) -> dict:
        out = tmp_path / "gpu_smoke.json"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join(
                       p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.run([sys.executable, "-m", "tests.gpu.smoke", *args, "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
        return json.loads(out.read_text())

    return run
