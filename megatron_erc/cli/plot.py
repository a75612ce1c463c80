"""``megatron-erc plot RUN_DIR [RUN_DIR ...]``: a PNG dashboard of a run's metrics.jsonl, or
of several runs overlaid for comparison (one colour per run, labelled).

Each argument is a run directory (holding ``metrics.jsonl``), ``LABEL=RUN_DIR``, or a
directory of runs (every run below it, e.g. an ablation's ``OUT/rl``: labels
``dapo_erc/seed0``, ...). Default labels are the run paths without their common part.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_erc.errors import UserError
from megatron_erc.trainer.metrics import read_metrics

PANELS = [
    ("accuracy", ["accuracy", "val/accuracy"]),
    ("reward", ["reward/mean"]),
    ("response length", ["response/len_mean", "response/len_max"]),
    ("entropy", ["entropy/mean", "entropy/old_mean"]),
    ("ERC dropped fraction", ["erc/dropped_frac", "erc/dropped_low_frac",
                              "erc/dropped_high_frac"]),
    ("entropy ratio quantiles", ["erc/ratio_p05", "erc/ratio_p50", "erc/ratio_p95"]),
    ("PPO clip fraction", ["clip/low_frac", "clip/high_frac", "clip/dual_frac"]),
    ("approx KL", ["kl/approx"]),
    ("grad norm", ["grad_norm"]),
    ("learning rate", ["lr"]),
    ("dynamic sampling groups kept", ["dynamic_sampling/groups_kept"]),
    ("time per step (s)", ["time/generate", "time/score", "time/forward", "time/update",
                           "time/sync"]),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir) if "step" in r]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no RL steps to plot")
    cols = 4
    fig, axes = plt.subplots((len(PANELS) + cols - 1) // cols, cols, figsize=(18, 11))
    for ax, (title, keys) in zip(axes.flat, PANELS, strict=False):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle(f"megatron-erc run: {run_dir}")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "dashboard.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def find_runs(args: list[str]) -> dict[str, Path]:
    """Label -> run directory for the command's arguments (see the module docstring)."""
    found: list[tuple[str | None, Path]] = []
    for arg in args:
        label, sep, path = arg.partition("=")
        if not sep or Path(arg).exists():
            label, path = None, arg
        root = Path(path)
        if (root / "metrics.jsonl").is_file():
            found.append((label, root))
            continue
        below = sorted(m.parent for m in root.rglob("metrics.jsonl")) if root.is_dir() else []
        if not below:
            raise UserError(f"{root}: no metrics.jsonl in it or below it; pass run "
                            "directories (RUN_DIR/metrics.jsonl) or a directory of runs",
                            kind="data")
        found += [(f"{label}/{d.relative_to(root)}" if label else None, d) for d in below]
    common = os.path.commonpath([str(d.resolve()) for _, d in found]) if len(found) > 1 else ""
    runs: dict[str, Path] = {}
    for label, d in found:
        name = label or (os.path.relpath(d.resolve(), common) if common else d.name) or d.name
        if name in runs:
            raise UserError(f"two runs are labelled {name!r}: give them labels, "
                            "LABEL=RUN_DIR", kind="data")
        runs[name] = d
    return runs


def plot_runs(runs: dict[str, Path], out: str | Path) -> Path:
    """Every panel of the dashboard with each run of ``runs`` (label -> run directory) in a
    colour of its own; a panel's metrics differ by line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = {label: [r for r in read_metrics(d) if "step" in r] for label, d in runs.items()}
    empty = [str(runs[label]) for label, r in rows.items() if not r]
    if empty:
        raise UserError(f"no RL steps to plot in {', '.join(empty)}/metrics.jsonl", kind="data")
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # as many as a panel's metrics
    cols = 4
    fig, axes = plt.subplots((len(PANELS) + cols - 1) // cols, cols, figsize=(18, 12))
    for ax, (title, keys) in zip(axes.flat, PANELS, strict=False):
        shown = []
        for i, label in enumerate(runs):
            for j, k in enumerate(keys):
                pts = [(r["step"], r[k]) for r in rows[label] if r.get(k) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, color=colours[i % len(colours)],
                            ls=styles[j % len(styles)], lw=1.2,
                            marker="o" if len(pts) < 20 else None, ms=2)
                    if k not in shown:
                        shown.append(k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(shown) > 1:  # which line style is which metric
            ax.legend([Line2D([], [], color="black", ls=styles[keys.index(k) % len(styles)])
                       for k in shown], shown, fontsize=7)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    rows_of_labels = -(-len(runs) // 6)
    fig.legend([Line2D([], [], color=colours[i % len(colours)], lw=3)
                for i in range(len(runs))], list(runs), loc="upper center",
               ncol=min(len(runs), 6), fontsize=9, frameon=False)
    fig.suptitle("megatron-erc runs", x=0.01, y=0.995, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985 - 0.025 * rows_of_labels))  # room for the labels
    out = Path(out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
