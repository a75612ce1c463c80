"""Per-step metrics: ``RUN_DIR/metrics.jsonl`` (one JSON object per line, appended, so a
resumed run continues the file) and TensorBoard events, written by global rank 0 only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")  # noqa: SIM115 - lives as long as the run
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is optional: metrics.jsonl is the source of truth
            self._tb = None

    def log(self, metrics: dict, step_key: str = "step") -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None and step_key in metrics:
            for k, v in metrics.items():
                if k != step_key and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, metrics[step_key])
            self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Progress:
    """The console view of a run: one line per step (kept in logs) and, on a terminal, a
    tqdm bar below them with the step count, elapsed time and ETA. Rank 0 only."""

    def __init__(self, steps: int, start_step: int = 0, enabled: bool = True, file=None):
        from tqdm import tqdm

        self.steps, self.enabled = steps, enabled
        self._bar = tqdm(total=steps, initial=start_step, desc="[rl]", unit="step",
                         dynamic_ncols=True, leave=False, file=file,
                         disable=None if enabled else True)  # None: off unless a terminal

    def __call__(self, m: dict) -> None:
        if not self.enabled:
            return
        self._bar.write(progress_line(m, self.steps))
        sys.stdout.flush()
        if m.get("step", 0) > self._bar.n:
            self._bar.set_postfix(acc=f"{m.get('accuracy', 0):.1%}",
                                  erc_drop=f"{m.get('erc/dropped_frac', 0):.1%}", refresh=False)
            self._bar.update(m["step"] - self._bar.n)
            self._bar.refresh()  # a step takes seconds: never rate-limit the bar

    def close(self) -> None:
        self._bar.close()


def progress_line(m: dict, steps: int) -> str:
    val = f"  val_acc {m['val/accuracy']:.1%}" if "val/accuracy" in m else ""
    if m["step"] == 0:
        return f"[rl] step   0/{steps}  (before RL){val}"
    clip = m.get("clip/high_frac", 0.0) + m.get("clip/low_frac", 0.0)
    return (f"[rl] step {m['step']:3d}/{steps}  acc {m.get('accuracy', 0):.1%}  "
            f"reward {m.get('reward/mean', 0):+.3f}  erc_drop {m.get('erc/dropped_frac', 0):.1%}"
            f"  clip {clip:.2%}  grad_norm {m.get('grad_norm', 0):.2f}  "
            f"{m.get('time/step', 0):.1f}s{val}")
