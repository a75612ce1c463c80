"""Acceptance test of issue 19: the README's first command (``megatron-erc demo``, here with
a few steps) keeps its console to our own lines and ends with the run's summary; vLLM's output
goes to RUN_DIR/logs/engine.log, without the two harmless messages that read as failures."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from megatron_erc.trainer.metrics import read_metrics
from tests.e2e.console import assert_console_contract
from tests.unit.test_loggers import wandb_history

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_demo_console_is_ours_and_ends_with_a_summary(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    # W&B and MLflow (in .[dev]) too: their start and their shutdown keep the console quiet
    extra = [x for x in ("wandb", "mlflow") if importlib.util.find_spec(x) is not None]
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_erc.cli", "demo", "--out", str(out),
         "--sft-steps", "5", "--rl-steps", "2", "--loggers", "jsonl", "tensorboard", *extra],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    lines = assert_console_contract(proc.stdout)
    run = json.loads((out / "rl" / "summary.json").read_text())
    summary = [line for line in lines if line.startswith("[summary] ")]
    assert summary[0].startswith("[summary] validation accuracy ")
    for name in ("dashboard", "tensorboard", "checkpoint"):
        assert any(line.split()[1] == name and line.endswith(run["paths"][name])
                   for line in summary), (name, summary)
    assert pathlib.Path(run["paths"]["dashboard"]).stat().st_size > 10_000
    config = json.loads((out / "rl" / "config.json").read_text())
    engine_log = out / "rl" / "logs" / "engine.log"
    if "engine=vllm" in proc.stdout:
        text = engine_log.read_text()
        assert f"[summary] engine log   {engine_log.resolve()}" in lines
        assert "vllm.v1.engine.core" in text and config["rollout"]["engine_log_level"] == "INFO"
        assert "Reloading weights inplace" in text  # the initial sync reloaded weights
        for harmless in ("Chat template warmup failed", "RotaryEmbedding: Failed to load"):
            assert harmless not in text
    else:
        assert not engine_log.exists()

    # every logger got the RL run's reduced metrics, step 0's validation included
    rows = {r["step"]: r for r in read_metrics(out / "rl")}
    assert sorted(rows) == [0, 1, 2] and rows[2]["val/accuracy"] is not None
    expect = {(s, k): rows[s][k] for s in rows for k in ("accuracy", "val/accuracy")
              if rows[s].get(k) is not None}
    if "wandb" in extra:
        history = wandb_history(pathlib.Path(run["paths"]["wandb"]))
        assert {(s, k): history[s][k] for s, k in expect} == expect
    if "mlflow" in extra:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the logger does
        client = MlflowClient(tracking_uri=pathlib.Path(run["paths"]["mlflow"]).as_uri())
        (r,) = client.search_runs([client.get_experiment_by_name("megatron-erc").experiment_id])
        assert r.data.params["rollout.engine_log_level"] == "INFO"
        got = {(m.step, k): m.value for k in ("accuracy", "val/accuracy")
               for m in client.get_metric_history(r.info.run_id, k)}
        assert got == expect
