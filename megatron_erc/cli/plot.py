"""``megatron-erc plot RUN_DIR``: a PNG dashboard of a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

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
