"""The ablation's report: statistics per run, paired ERC-vs-baseline comparisons, plots and
``docs/ablation.md``, from the runs ``megatron_erc.studies.ablation run`` finished (see there).
It reads finished run directories and ``ablation_spec``; it never imports the runner."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from megatron_erc.studies.ablation_spec import (
    LABELS,
    MODULE,
    REPO,
    SFT_OVERRIDES,
    TASK_DESCRIPTION,
    VARIANTS,
    rel,
)
from megatron_erc.trainer.metrics import read_metrics

SPIKE_K = 3.0
"""A grad-norm spike is a step whose grad norm exceeds ``SPIKE_K`` x the run's median."""
TAIL = 5
"""Training accuracy at the end of a run is the mean over its last ``TAIL`` steps."""


def load_runs(root: pathlib.Path) -> dict[str, dict[int, list[dict]]]:
    """``{variant: {seed: metric rows}}`` of every finished run under ``root/rl``."""

    out: dict[str, dict[int, list[dict]]] = {}
    for v in VARIANTS:
        for d in sorted((root / "rl" / v).glob("seed*")):
            if (d / "done.json").exists():
                out.setdefault(v, {})[int(d.name[4:])] = read_metrics(d)
    return out


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def run_stats(rows: list[dict]) -> dict:
    """Per-run summary numbers (one seed); the table averages them over seeds."""

    _, val = series(rows, "val/accuracy")
    _, acc = series(rows, "accuracy")
    _, ent = series(rows, "entropy/mean")
    _, gn = series(rows, "grad_norm")
    med = float(np.median(gn)) if gn else float("nan")

    def mean_of(key):
        return float(np.mean(series(rows, key)[1] or [float("nan")]))

    return {
        "val_start": val[0] if val else float("nan"),
        "val_final": val[-1] if val else float("nan"),
        "train_final": float(np.mean(acc[-TAIL:])) if acc else float("nan"),
        "entropy_final": ent[-1] if ent else float("nan"),
        "entropy_fluct": float(np.std(np.diff(ent))) if len(ent) > 2 else float("nan"),
        "grad_norm_max": max(gn) if gn else float("nan"),
        "grad_spikes": int(sum(g > SPIKE_K * med for g in gn)),
        "erc_drop": mean_of("erc/dropped_frac"),
        "clip_frac": float(np.mean([sum(r.get(k) or 0.0 for k in
                                        ("clip/low_frac", "clip/high_frac", "clip/dual_frac"))
                                    for r in rows if "grad_norm" in r] or [float("nan")])),
        "kl_mean": mean_of("kl/approx"),
        "ratio_p95_max": max(series(rows, "erc/ratio_p95")[1] or [float("nan")]),
        "skipped": int(sum(r.get("skipped_steps", 0) for r in rows)),
    }


TABLE = [  # (stat, column header, format)
    ("val_start", "val acc, warm start", "{:.1%}"),
    ("val_final", "val acc, final", "{:.1%}"),
    ("train_final", f"train acc, last {TAIL} steps", "{:.1%}"),
    ("entropy_fluct", "entropy fluctuation (std of step-to-step change)", "{:.4f}"),
    ("entropy_final", "final entropy", "{:.3f}"),
    ("grad_spikes", f"grad-norm spikes (> {SPIKE_K:g} x median)", "{:.1f}"),
    ("grad_norm_max", "max grad norm", "{:.2f}"),
    ("erc_drop", "ERC dropped frac (mean)", "{:.2%}"),
    ("clip_frac", "PPO clip frac (low+high+dual, mean)", "{:.3%}"),
    ("kl_mean", "approx KL to the rollout policy (mean)", "{:.3f}"),
    ("ratio_p95_max", "entropy ratio p95 (max over steps)", "{:.2f}"),
    ("skipped", "collapsed steps (no group with unequal rewards)", "{:.1f}"),
]


def _mean_sd(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return fmt.format(np.mean(xs)) + (f" ± {fmt.format(np.std(xs))}" if len(xs) > 1 else "")


def plot_metric(runs: dict, keys: list[tuple[str, str]], title: str, out: pathlib.Path) -> None:
    """One panel per ``(metric, label)``; per variant the seed mean, shaded min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for v, seeds in runs.items():
            if key.startswith("erc/") and not v.endswith("_erc"):
                continue  # logged as 0 when ERC is off
            per_seed = [dict(zip(*series(rows, key), strict=True)) for rows in seeds.values()]
            steps = sorted(set().union(*per_seed))
            if not steps:
                continue
            ys = np.array([[d.get(s, np.nan) for s in steps] for d in per_seed])
            color, style = f"C{list(VARIANTS).index(v) // 2}", "-" if v.endswith("_erc") else "--"
            ax.plot(steps, np.nanmean(ys, 0), style, color=color, label=LABELS[v],
                    marker="o" if len(steps) < 8 else None, ms=3)
            if len(per_seed) > 1:
                ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=color,
                                alpha=0.12 if style == "-" else 0.06)
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


PLOTS = {  # file name -> (title, panels)
    "accuracy.png": ("Accuracy (mean over seeds; shaded: min..max)",
                     [("val/accuracy", "validation accuracy"),
                      ("accuracy", "training-rollout accuracy")]),
    "entropy.png": ("Policy entropy", [("entropy/mean", "mean token entropy (current policy)")]),
    "grad_norm.png": ("Gradient norm (before clipping at 1.0)", [("grad_norm", "grad norm")]),
    "clip_drop.png": ("What the clipping mechanisms touch",
                      [("erc/dropped_frac", "ERC dropped fraction"),
                       ("clip/high_frac", "PPO clip fraction, ratio > 1+eps_high"),
                       ("clip/low_frac", "PPO clip fraction, ratio < 1-eps_low")]),
}


def write_report(root: pathlib.Path, docs: pathlib.Path) -> pathlib.Path:
    """``docs/ablation.md`` and ``docs/ablation/*.png`` from the runs under ``root``."""
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"no finished runs under {root / 'rl'}")
    manifest = json.loads((root / "manifest.json").read_text()) \
        if (root / "manifest.json").exists() else {}
    (docs / "ablation").mkdir(parents=True, exist_ok=True)
    for name, (title, keys) in PLOTS.items():
        plot_metric(runs, keys, title, docs / "ablation" / name)
    stats = {v: {s: run_stats(rows) for s, rows in seeds.items()} for v, seeds in runs.items()}
    md = render_markdown(root, manifest, runs, stats)
    (docs / "ablation.md").write_text(md)
    (root / "stats.json").write_text(json.dumps(stats, indent=2))
    return docs / "ablation.md"


def paired(stats: dict, base: str, key: str, lower_is_better: bool) -> str | None:
    """``ERC better in k/n seeds`` for one metric, seeds paired (same seed, same prompts)."""
    a, b = stats.get(base, {}), stats.get(base + "_erc", {})
    seeds = sorted(set(a) & set(b))
    pairs = [(a[s][key], b[s][key]) for s in seeds if a[s][key] == a[s][key]
             and b[s][key] == b[s][key]]
    if not pairs:
        return None
    better = sum((y < x) if lower_is_better else (y > x) for x, y in pairs)
    worse = sum((y > x) if lower_is_better else (y < x) for x, y in pairs)
    return f"better in {better}/{len(pairs)} seeds, worse in {worse}/{len(pairs)}"


def render_markdown(root: pathlib.Path, manifest: dict, runs: dict, stats: dict) -> str:
    code = manifest.get("code", {})
    cfg = json.loads(next(iter(runs_dirs(root, runs))).joinpath("config.json").read_text())
    seeds = sorted({s for v in runs.values() for s in v})
    L = ["# Does ERC stabilise off-policy RL? A miniature reproduction", "",
         f"> Generated by `python -m {MODULE} report` from the runs in "
         f"`{rel(root)}/`; do not edit by hand, regenerate.", ""]
    L += ["## Setup", ""]
    for inv in manifest.get("invocations") or [manifest]:
        c = inv.get("code") or {}
        if inv.get("ran", True):
            L.append(f"- Code: commit `{c.get('commit', 'unknown')}`"
                     + (f" (uncommitted changes in the working tree: "
                        f"{', '.join(c['dirty_files'])})" if c.get("dirty_files") else "")
                     + f", recorded by the runner at {inv.get('started', '?')}"
                     + (f" for `{inv['command']}`, which ran {len(inv['ran'])} RL runs in "
                        f"{inv.get('total_seconds')} s" if "ran" in inv else "") + ".")
    L += [
          f"- Task: {TASK_DESCRIPTION}; tiny random-init Qwen2-layout model "
          "(`examples/tiny/config.json`), SentencePiece vocabulary of 320.",
          f"- One shared warm start: {manifest.get('sft_steps', '?')} SFT steps "
          f"(`examples/tiny/sft.yaml` with {' '.join(SFT_OVERRIDES)}); every RL run starts "
          "from that same HF directory.",
          f"- RL (`{manifest.get('config', 'examples/ablation/offpolicy.yaml')}`): "
          f"{cfg['run']['steps']} steps, {cfg['rollout']['prompts_per_step']} prompts x "
          f"{cfg['rollout']['n']} responses per step (dynamic sampling, up to "
          f"{cfg['rollout']['max_gen_batches']} generation rounds), "
          f"**{cfg['run']['updates_per_rollout']} mini-batch updates per rollout** (all but the "
          f"first off-policy), lr {cfg['optim']['lr']:g}, grad clip {cfg['optim']['clip_grad']}, "
          f"positive-example NLL {cfg['algo']['pos_nll_coef']}, temperature "
          f"{cfg['rollout']['temperature']}, <= {cfg['rollout']['max_response_tokens']} "
          f"response tokens, rollout engine `{cfg['rollout']['engine']}`.",
          f"- Validation: first {cfg['validation']['max_prompts']} held-out prompts x "
          f"{cfg['validation']['samples_per_prompt']} samples at temperature "
          f"{cfg['validation']['temperature']}, at step 0 and every "
          f"{cfg['validation']['every']} steps.",
          f"- Seeds {seeds} (`run.seed`: prompt order, sampling); a seed means the same for "
          "every variant, so comparisons below are paired by seed.",
          "- Variants (only `algo.*` differs):", ""]
    for v in runs:
        L.append(f"  - **{LABELS[v]}**: `{' '.join(VARIANTS[v])}`")
    if manifest.get("extra_overrides"):
        L.append(f"- Extra overrides for every run: `{' '.join(manifest['extra_overrides'])}`")
    L += ["", "## Results", "",
          "Mean ± std over seeds (population std; "
          f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}). Fractions are per response token, "
          "averaged over the steps that trained. A *collapsed* step is one where every sampled "
          "group had equal rewards (in practice: all wrong), so there was nothing to train on; "
          "a run that reaches 0% accuracy stays there. Entropy fluctuation and grad-norm "
          "statistics only cover steps that trained (n/a: fewer than 3). The entropy ratio is "
          "logged for every variant, so the last columns also show how far the policy's "
          "entropy moved where ERC was off.", ""]
    for cols in (TABLE[:3] + TABLE[-1:], TABLE[3:-1]):
        L.append("| variant | seeds | " + " | ".join(h for _, h, _ in cols) + " |")
        L.append("|---" * (len(cols) + 2) + "|")
        for v, per_seed in stats.items():
            cells = [_mean_sd([st[k] for st in per_seed.values()], f)
                     if k != "erc_drop" or v.endswith("_erc") else "(off)" for k, _, f in cols]
            L.append(f"| {LABELS[v]} | {len(per_seed)} | " + " | ".join(cells) + " |")
        L.append("")
    L += ["Paired by seed, ERC vs the same surrogate without it:", ""]
    for base in ("dapo", "gppo"):
        for key, what, lower in (("val_final", "final val accuracy", False),
                                 ("train_final", "final train accuracy", False),
                                 ("entropy_fluct", "entropy fluctuation", True),
                                 ("grad_spikes", "grad-norm spikes", True)):
            res = paired(stats, base, key, lower)
            if res:
                L.append(f"- {LABELS[base]}+ERC vs {LABELS[base]}, {what}: {res}")
    L += [""] + [f"![{t}](ablation/{n})" for n, (t, _) in PLOTS.items()]
    L += ["", "## Wall time", ""]
    if manifest:
        secs = [r["seconds"] for r in manifest.get("runs", {}).values() if "seconds" in r]
        total = sum(i.get("total_seconds") or 0 for i in manifest.get("invocations", []))
        L.append(f"SFT warm start {manifest.get('sft_seconds') or '?'} s (once). RL runs "
                 + (f"{min(secs):.0f}-{max(secs):.0f} s each (mean {sum(secs) / len(secs):.0f}"
                    f" s), " if secs else "")
                 + f"{manifest.get('jobs', '?')} at a time on a machine shared with other jobs; "
                 f"all RL runs {total or manifest.get('total_seconds', '?')} s wall time.")
    L += ["", "## Reproduce", "", "```bash",
          f"git checkout {code.get('commit', '<commit>')}",
          "bash examples/ablation/run.sh" + (f" --seeds {' '.join(map(str, seeds))}"
                                             if seeds != [0, 1, 2] else "")
          + "   # or, step by step:",
          "# " + manifest.get("command", f"python -m {MODULE} run"),
          f"# python -m {MODULE} report --out {rel(root)}", "```", "",
          "One RL run by hand (what the runner executes per variant and seed):", "", "```bash"]
    first = next(iter(manifest.get("runs", {}).values()), {})
    if first:
        L.append(first["command"].replace(str(REPO) + "/", ""))
    L += ["```", ""]
    L += ["## What this can and cannot show", "",
          "- It is a ~1M-parameter model on single-digit arithmetic with a 320-token vocabulary, "
          "trained for tens of steps on a CPU; the paper's runs are 1.5B/7B models on "
          "competition maths for hundreds of steps. Entropy dynamics of a tiny model on a toy "
          "task need not resemble those of a reasoning model.",
          "- The off-policy pressure is made artificially high (many updates per rollout, a "
          "large learning rate) so that differences can appear within a few minutes per run.",
          f"- {len(seeds)} seed(s) per variant: a difference smaller than the seed spread is "
          "not evidence of anything. No significance test is attempted.",
          "- What it does test: that ERC is wired into both surrogates, that it drops a "
          "substantial fraction of tokens while PPO clipping touches few, and whether, in "
          "this regime, that changes entropy fluctuation, gradient spikes and accuracy.", ""]
    notes = REPO / "examples" / "ablation" / "conclusion.md"
    if notes.exists():  # hand-written reading of the recorded run (the numbers above rule)
        L += [notes.read_text().strip(), ""]
    return "\n".join(L)


def runs_dirs(root: pathlib.Path, runs: dict):
    for v, seeds in runs.items():
        for s in seeds:
            yield root / "rl" / v / f"seed{s}"
