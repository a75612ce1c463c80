"""run.loggers: every logger writes what it was given, read back from its own files (the W&B
offline run, the MLflow file store, TensorBoard events, metrics.jsonl); a logger that cannot
start is a UserError when the writer starts; the end-of-run summary."""

from __future__ import annotations

import json
import math

import pytest

from megatron_erc.config import ConfigError, load_config
from megatron_erc.errors import UserError
from megatron_erc.trainer import loggers
from megatron_erc.trainer.config import TrainConfig
from megatron_erc.trainer.metrics import MetricsWriter, read_metrics
from megatron_erc.trainer.summary import summarize, summary_lines

STEPS = [{"step": 0, "val/accuracy": 0.125},
         {"step": 1, "accuracy": 0.25, "erc/dropped_frac": 0.5, "loss": float("nan")},
         {"step": 2, "accuracy": 0.75, "erc/dropped_frac": 0.25, "val/accuracy": 0.5}]


def wandb_history(run_dir) -> dict[int, dict[str, float]]:
    """Step -> logged values, from the records of an offline ``run-*.wandb`` file (LevelDB log
    format: 32 KiB blocks of records with a 7-byte header; one W&B protobuf per record)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, block, pending, out = path.read_bytes(), 7, 32 * 1024, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST, MIDDLE/LAST
        if kind not in (1, 4):
            continue
        record = Record.FromString(pending)
        if record.WhichOneof("record_type") == "history":
            h = record.history
            out[h.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                               for i in h.item if not (i.key or "").startswith("_")}
    return out


@pytest.mark.parametrize("names", [["jsonl", "tensorboard", "wandb", "mlflow"]])
def test_every_logger_holds_the_logged_metrics(tmp_path, names):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    writer = MetricsWriter(tmp_path, loggers=names, config={"run": {"seed": 3}, "algo": {}})
    for m in STEPS:
        writer.log(m)
    paths = writer.paths()
    writer.close()
    finite = {m["step"]: {k: v for k, v in m.items() if k != "step" and math.isfinite(v)}
              for m in STEPS}

    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["loss"] is None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(paths["tensorboard"]))
    tb.Reload()
    assert {(e.step, e.value) for e in tb.Scalars("accuracy")} == {(1, 0.25), (2, 0.75)}
    assert "loss" not in tb.Tags()["scalars"]  # NaN is left out, not logged

    history = wandb_history(paths["wandb"])
    for step, values in finite.items():
        assert {k: history[step][k] for k in values} == values
    assert "loss" not in history[1]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=paths["mlflow"].resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("megatron-erc").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"run.seed": "3"}
    for key in ("accuracy", "erc/dropped_frac", "val/accuracy"):
        got = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)}
        assert got == {(s, v[key]) for s, v in finite.items() if key in v}


def test_a_logger_that_cannot_start_stops_the_writer_at_start(tmp_path):
    pytest.importorskip("mlflow")
    (tmp_path / "mlruns").write_text("a file where the store's directory should be")
    with pytest.raises(UserError, match="run.loggers: mlflow failed to start"):
        MetricsWriter(tmp_path, loggers=["jsonl", "mlflow"])
    assert MetricsWriter(tmp_path, enabled=False, loggers=["mlflow"]).loggers == []


def test_a_missing_logger_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(loggers._PACKAGES, "wandb", "megatron_erc_no_such_package")
    with pytest.raises(UserError, match=r"pip install -c constraints.txt '\.\[wandb\]'"):
        loggers.check_loggers(["jsonl", "wandb"])


def test_run_loggers_config():
    assert load_config(TrainConfig, None, ["run.loggers=wandb"]).run.loggers == ["wandb"]
    assert load_config(TrainConfig, None, ["run.loggers=[jsonl, mlflow]"]).run.loggers == [
        "jsonl", "mlflow"]
    for bad in ("[jsonl, neptune]", "[jsonl, jsonl]", "3"):
        with pytest.raises(ConfigError, match="run.loggers"):
            load_config(TrainConfig, None, [f"run.loggers={bad}"])


def test_summary_reports_accuracy_time_split_and_paths(tmp_path):
    timed = {"time/step": 2.0, "time/generate": 1.0, "time/score": 0.25, "time/forward": 0.25,
             "time/update": 0.5, "time/sync": 0.0, "tokens_per_s": 1000.0}
    history = [STEPS[0], {**STEPS[1], **timed}, {**STEPS[2], **timed, "time/step": 4.0},
               {"step": 3, "skipped_steps": 1.0}]
    s = summarize(history, wall_s=12.34, paths={"dashboard": tmp_path / "d.png",
                                                "checkpoint": None})
    assert s["val_first"] == {"step": 0, "accuracy": 0.125}
    assert s["val_last"] == {"step": 2, "accuracy": 0.5}
    assert s["median_s"]["step"] == 3.0 and s["median_tokens_per_s"] == 1000.0
    assert (s["steps"], s["steps_this_run"], s["steps_skipped"]) == (3, 3, 1)
    lines = summary_lines(s)
    assert lines[0] == "[summary] validation accuracy 12.5% at step 0 -> 50.0% at step 2"
    assert "generate 1.00, score 0.25, forward 0.25, update 0.50, sync 0.00" in lines[2]
    assert lines[-1].endswith(str((tmp_path / "d.png").resolve()))
    assert not any("checkpoint" in line for line in lines)
    undrawn = summary_lines(summarize(history, wall_s=1.0, paths={}, run_dir=tmp_path))
    assert undrawn[-1] == f"[summary] dashboard  megatron-erc plot {tmp_path.resolve()}  (draws it)"
