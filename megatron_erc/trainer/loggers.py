"""Where step metrics go: ``run.loggers``, any of ``jsonl``, ``tensorboard``, ``wandb``,
``mlflow``. Each logger is started at the beginning of a run (a missing package or a failed
start is a ``UserError`` then, not a crash at step 1) and receives every step's metrics
after they are reduced over ranks, on global rank 0 only (``MetricsWriter``).

* ``jsonl``: ``RUN_DIR/metrics.jsonl``, one JSON object per line, appended (a resumed run
  continues the file). ``megatron-erc plot`` and the end-of-run summary read it.
* ``tensorboard``: ``RUN_DIR/tensorboard`` event files.
* ``wandb``: Weights & Biases in offline mode, ``RUN_DIR/wandb/offline-run-*``; nothing leaves
  the machine (``wandb sync DIR`` uploads it later). Extra: ``pip install '.[wandb]'``.
* ``mlflow``: an MLflow file store, ``RUN_DIR/mlruns``, the config as the run's parameters.
  Extra: ``pip install '.[mlflow]'``. MLflow 3 reads a file store only when asked:
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN_DIR/mlruns`` (the UI is in
  the full ``mlflow`` package).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from megatron_erc.errors import UserError

LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_EXTRAS = {"tensorboard": "tensorboard", "wandb": "'.[wandb]'", "mlflow": "'.[mlflow]'"}


def check_loggers(names) -> None:
    """Every logger in ``names`` is known and its package importable (every rank, at start:
    cheap, no imports)."""
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"run.loggers: unknown logger {name!r}; use any of {LOGGERS}",
                            kind="config")
        package = _PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"run.loggers includes {name}, but the {package} package is not "
                            f"installed: pip install -c constraints.txt {_EXTRAS[name]} (or "
                            f"drop {name} from run.loggers)", kind="config")


def start_loggers(names, run_dir: Path, *, config: dict | None = None) -> list:
    """Start each logger of ``names`` in ``run_dir``; a failure is a ``UserError`` naming it."""
    check_loggers(names)
    started = []
    try:
        for name in names:
            try:
                started.append(_CLASSES[name](run_dir, config or {}))
            except Exception as e:  # noqa: BLE001 - any failure to start is reported alike
                raise UserError(f"run.loggers: {name} failed to start in {run_dir}: "
                                f"{type(e).__name__}: {e}", kind="config") from e
    except BaseException:
        for logger in started:
            logger.close()
        raise
    return started


def finite_scalars(metrics: dict, step_key: str = "step") -> dict[str, float]:
    """The metrics a dashboard can plot: finite numbers, without the step itself."""
    return {k: float(v) for k, v in metrics.items()
            if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class JsonlLogger:
    name = "jsonl"

    def __init__(self, run_dir: Path, config: dict):
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 - lives as long as the run

    def log(self, metrics: dict, step_key: str = "step") -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "tensorboard"
        self._tb = SummaryWriter(str(self.path))

    def log(self, metrics: dict, step_key: str = "step") -> None:
        if step_key not in metrics:
            return
        for k, v in finite_scalars(metrics, step_key).items():
            self._tb.add_scalar(k, v, metrics[step_key])
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class WandbLogger:
    """W&B offline: the run is written under ``RUN_DIR/wandb``; no account, no network."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # no banner lines on our console
        self._run = wandb.init(
            mode="offline", dir=str(run_dir), project="megatron-erc", name=run_dir.name,
            config=config, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.path = Path(self._run.dir).parent  # RUN_DIR/wandb/offline-run-*

    def log(self, metrics: dict, step_key: str = "step") -> None:
        values = finite_scalars(metrics, step_key)
        if values:
            self._run.log(values, step=metrics.get(step_key))

    def close(self) -> None:
        self._run.finish()


class MlflowLogger:
    """MLflow file store ``RUN_DIR/mlruns``, experiment ``megatron-erc``, one run per start."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.path = run_dir / "mlruns"
        # A file store needs no server and no database (mlflow-skinny suffices); MLflow 3.x
        # keeps it in maintenance mode and refuses it unless asked. `mlflow migrate-filestore`
        # moves a run's store into a database later if wanted.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=self.path.resolve().as_uri())
        exp = self._client.get_experiment_by_name("megatron-erc")
        exp_id = exp.experiment_id if exp else self._client.create_experiment("megatron-erc")
        self.run_id = self._client.create_run(exp_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in sorted(_flatten(config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict, step_key: str = "step") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(metrics.get(step_key, 0))
        values = [Metric(k, v, now, step) for k, v in finite_scalars(metrics, step_key).items()]
        if values:
            self._client.log_batch(self.run_id, metrics=values)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_CLASSES = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger,
            "mlflow": MlflowLogger}
