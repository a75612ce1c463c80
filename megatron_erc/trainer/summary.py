"""The end-of-run summary: what the run achieved, where its time went and where its outputs
are. Printed by rank 0 after training and written to ``RUN_DIR/summary.json``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

TIME_SPLIT = ("generate", "score", "forward", "update", "sync")
"""The parts of ``time/step`` (``rl._time_split``), in the order a step runs them."""


def summarize(history: list[dict], *, wall_s: float, paths: dict[str, Path],
              run_dir: Path | None = None) -> dict:
    """``history``: the step metrics of this run (``rl.train``, with the step-0 validation
    row if any). ``paths``: name -> output location (dashboard, logger outputs, checkpoint,
    engine log); missing ones are left out."""
    val = [(m["step"], m["val/accuracy"]) for m in history if m.get("val/accuracy") is not None]
    steps = [m for m in history if m.get("step", 0) > 0]
    timed = [m for m in steps if "time/step" in m]

    def median(key: str) -> float | None:
        values = [m[key] for m in timed if m.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "steps": steps[-1]["step"] if steps else 0,
        "steps_this_run": len(steps),
        "steps_skipped": sum(1 for m in steps if m.get("skipped_steps")),
        "wall_s": round(wall_s, 1),
        "val_first": {"step": val[0][0], "accuracy": val[0][1]} if val else None,
        "val_last": {"step": val[-1][0], "accuracy": val[-1][1]} if len(val) > 1 else None,
        "median_s": {k: median(f"time/{k}") for k in ("step", *TIME_SPLIT)},
        "median_tokens_per_s": median("tokens_per_s"),
        "paths": {k: str(Path(v).resolve()) for k, v in paths.items() if v is not None},
        **({"run_dir": str(Path(run_dir).resolve())} if run_dir is not None else {}),
    }


def summary_lines(s: dict) -> list[str]:
    """The console view of ``summarize``'s result."""
    lines = []
    first, last = s["val_first"], s["val_last"]
    if first is not None:
        after = (f" -> {last['accuracy']:.1%} at step {last['step']}" if last else "")
        lines.append(f"validation accuracy {first['accuracy']:.1%} at step {first['step']}"
                     f"{after}")
    skipped = f" ({s['steps_skipped']} skipped: no group with unequal rewards)" \
        if s["steps_skipped"] else ""
    lines.append(f"{s['steps_this_run']} steps (to step {s['steps']}) in {s['wall_s']:.0f} s "
                 f"wall time{skipped}")
    med = s["median_s"]
    if med["step"] is not None:
        parts = ", ".join(f"{k} {med[k]:.2f}" for k in TIME_SPLIT if med[k] is not None)
        tps = s["median_tokens_per_s"]
        lines.append(f"median step {med['step']:.2f} s: {parts}"
                     + (f"; {tps:,.0f} tokens/s" if tps is not None else ""))
    paths = dict(s["paths"])
    if "dashboard" not in paths and "run_dir" in s:
        paths = {"dashboard": f"megatron-erc plot {s['run_dir']}  (draws it)", **paths}
    width = max((len(k) for k in paths), default=0)
    lines += [f"{k:<{width}}  {v}" for k, v in paths.items()]
    return ["[summary] " + line for line in lines]


def write_summary(run_dir: Path, s: dict) -> Path:
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(s, indent=2))
    return path
