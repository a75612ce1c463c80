"""The ablation's report: statistics per run, paired comparisons with the regime's DAPO
baseline (bootstrap intervals, ``ablation_stats.py``), plots per regime and
``docs/ablation.md``, from the runs ``megatron_erc.studies.ablation run`` finished (see there).
It reads finished run directories and ``ablation_spec``; it never imports the runner."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from megatron_erc.studies.ablation_spec import (
    BASELINE,
    LABELS,
    MECHANISMS,
    MODULE,
    REGIME_LABELS,
    REGIMES,
    REPO,
    SFT_OVERRIDES,
    TASK_DESCRIPTION,
    TOUCHED,
    VARIANTS,
    mechanisms,
    rel,
    run_dir,
)
from megatron_erc.studies.ablation_stats import (
    BOOT_RESAMPLES,
    BOOT_SEED,
    QUANTITIES,
    fmt_interval,
    paired,
    reading,
)
from megatron_erc.trainer.metrics import read_metrics

SPIKE_K = 3.0
"""A grad-norm spike is a step whose grad norm exceeds ``SPIKE_K`` x the run's median."""

Runs = dict[str, dict[str, dict[int, list[dict]]]]  # regime -> variant -> seed -> rows


def load_runs(root: pathlib.Path) -> Runs:
    """``{regime: {variant: {seed: metric rows}}}`` of every finished run under ``root/rl``."""
    out: Runs = {}
    for r in REGIMES:
        for v in VARIANTS:
            for d in sorted(run_dir(root, r, v, 0).parent.glob("seed*")):
                if (d / "done.json").exists():
                    out.setdefault(r, {}).setdefault(v, {})[int(d.name[4:])] = read_metrics(d)
    return out


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _frac(rows: list[dict], keys) -> float:
    """Mean over the steps that trained of the summed per-token fractions ``keys``."""
    vals = [sum(r.get(k) or 0.0 for k in keys) for r in rows if "grad_norm" in r]
    return float(np.mean(vals)) if vals else float("nan")


def run_stats(rows: list[dict]) -> dict:
    """Per-run summary numbers (one seed); the tables average them over seeds."""
    _, val = series(rows, "val/accuracy")
    _, ent = series(rows, "entropy/mean")
    _, gn = series(rows, "grad_norm")
    med = float(np.median(gn)) if gn else float("nan")
    nan = float("nan")
    st = {
        "val_start": val[0] if val else nan,
        "val_final": val[-1] if val else nan,
        "val_gain": val[-1] - val[0] if val else nan,
        "entropy_final": ent[-1] if ent else nan,
        "entropy_fluct": float(np.std(np.diff(ent))) if len(ent) > 2 else nan,
        "grad_spikes": int(sum(g > SPIKE_K * med for g in gn)) if gn else nan,
        "grad_norm_max": max(gn) if gn else nan,
        "touched": _frac(rows, TOUCHED),
        "kl_mean": float(np.mean(series(rows, "kl/approx")[1] or [nan])),
        "skipped": int(sum(r.get("skipped_steps", 0) for r in rows)),
    }
    for m, (_, keys) in MECHANISMS.items():
        st[f"frac_{m}"] = _frac(rows, keys)
    return st


TABLE = [  # (stat, column header, format)
    ("val_start", "val acc, warm start", "{:.1%}"),
    ("val_final", "val acc, final", "{:.1%}"),
    ("val_gain", "gain", "{:+.1%}"),
    ("entropy_fluct", "entropy fluctuation", "{:.4f}"),
    ("grad_spikes", f"grad-norm spikes (> {SPIKE_K:g} x median)", "{:.1f}"),
    ("grad_norm_max", "max grad norm", "{:.2f}"),
    ("kl_mean", "approx KL (mean)", "{:.3f}"),
    ("skipped", "collapsed steps", "{:.1f}"),
]


def _mean_sd(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return fmt.format(np.mean(xs)) + (f" ± {fmt.format(np.std(xs))}" if len(xs) > 1 else "")


def plot_regime(runs: dict, regime: str, out: pathlib.Path) -> None:
    """Validation and training accuracy, entropy and grad norm per variant: the seed mean,
    shaded min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("val/accuracy", "validation accuracy"), ("accuracy", "training-rollout accuracy"),
            ("entropy/mean", "mean token entropy"), ("grad_norm", "grad norm (before clip)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
    for ax, (key, label) in zip(axes.flat, keys, strict=True):
        for v, seeds in runs.items():
            per_seed = [dict(zip(*series(rows, key), strict=True)) for rows in seeds.values()]
            steps = sorted(set().union(*per_seed))
            if not steps:
                continue
            ys = np.array([[d.get(s, np.nan) for s in steps] for d in per_seed])
            i = list(VARIANTS).index(v)
            color, style = f"C{i % 10}", "-" if v == BASELINE or "erc" in v else "--"
            ax.plot(steps, np.nanmean(ys, 0), style, color=color, label=LABELS[v],
                    lw=2.2 if v == BASELINE else 1.2, marker="o" if len(steps) < 8 else None,
                    ms=3)
            if len(per_seed) > 1:
                ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=color,
                                alpha=0.08)
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"{REGIME_LABELS[regime]} (mean over seeds; shaded: min..max)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_report(root: pathlib.Path, docs: pathlib.Path) -> pathlib.Path:
    """``docs/ablation.md``, ``docs/ablation/<regime>.png`` and the per-seed statistics
    ``docs/ablation/stats.json`` from the runs under ``root``."""
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"no finished runs under {root / 'rl'}")
    manifest = json.loads((root / "manifest.json").read_text()) \
        if (root / "manifest.json").exists() else {}
    (docs / "ablation").mkdir(parents=True, exist_ok=True)
    for r in runs:
        plot_regime(runs[r], r, docs / "ablation" / f"{r}.png")
    stats = {r: {v: {s: run_stats(rows) for s, rows in seeds.items()}
                 for v, seeds in per_v.items()} for r, per_v in runs.items()}
    (docs / "ablation.md").write_text(render_markdown(root, manifest, runs, stats))
    (docs / "ablation" / "stats.json").write_text(json.dumps(stats, indent=2))
    return docs / "ablation.md"


def _setup(root: pathlib.Path, manifest: dict, runs: Runs, seeds: list[int]) -> list[str]:
    d = next(run_dir(root, r, v, s) for r in runs for v in runs[r] for s in runs[r][v])
    cfg = json.loads((d / "config.json").read_text())
    L = ["## Setup", ""]
    for inv in manifest.get("invocations") or [manifest]:
        if not inv.get("ran", True):
            continue  # a repeated `run` that found everything done
        c = inv.get("code") or {}
        L.append(f"- Code: commit `{c.get('commit', 'unknown')}`"
                 + (f" (uncommitted changes in the working tree: "
                    f"{', '.join(c['dirty_files'])})" if c.get("dirty_files") else "")
                 + f", recorded by the runner at {inv.get('started', '?')} for "
                 f"`{inv.get('command', '?')}`"
                 + (f", which ran {len(inv['ran'])} RL runs in {inv.get('total_seconds')} s"
                    if "ran" in inv else "") + ".")
    L += [f"- Task: {TASK_DESCRIPTION}; tiny random-init Qwen2-layout model "
          "(`examples/tiny/config.json`), SentencePiece vocabulary of 320.",
          f"- One shared warm start: {manifest.get('sft_steps', '?')} SFT steps "
          f"(`examples/tiny/sft.yaml` with {' '.join(SFT_OVERRIDES)}); every RL run of both "
          "regimes starts from that same HF directory.",
          f"- RL (`{manifest.get('config', 'examples/ablation/offpolicy.yaml')}`): "
          f"{cfg['run']['steps']} steps, {cfg['rollout']['prompts_per_step']} prompts x "
          f"{cfg['rollout']['n']} responses per step (dynamic sampling, up to "
          f"{cfg['rollout']['max_gen_batches']} generation rounds), lr {cfg['optim']['lr']:g}, "
          f"grad clip {cfg['optim']['clip_grad']}, positive-example NLL "
          f"{cfg['algo']['pos_nll_coef']}, temperature {cfg['rollout']['temperature']}, <= "
          f"{cfg['rollout']['max_response_tokens']} response tokens.",
          "- Regimes: " + "; ".join(f"**{REGIME_LABELS[r]}** (`{' '.join(REGIMES[r])}`)"
                                    for r in runs) + " (all updates but the first of a "
          "rollout are off-policy).",
          f"- Validation: first {cfg['validation']['max_prompts']} held-out prompts x "
          f"{cfg['validation']['samples_per_prompt']} samples at temperature "
          f"{cfg['validation']['temperature']}, at step 0 and every "
          f"{cfg['validation']['every']} steps.",
          f"- Seeds {seeds} (`run.seed`: prompt order, sampling); a seed means the same for "
          "every variant, so comparisons are paired by seed.",
          "- Variants (only `algo.*` differs):", ""]
    for v in VARIANTS:
        if any(v in runs[r] for r in runs):
            L.append(f"  - **{LABELS[v]}**: `{' '.join(VARIANTS[v])}`")
    if manifest.get("extra_overrides"):
        L.append(f"- Extra overrides for every run: `{' '.join(manifest['extra_overrides'])}`")
    return L + [""]


def _regime_section(r: str, stats: dict) -> list[str]:
    L = [f"### {REGIME_LABELS[r]}", "", f"![{REGIME_LABELS[r]}](ablation/{r}.png)", "",
         "| variant | seeds | " + " | ".join(h for _, h, _ in TABLE) + " |",
         "|---" * (len(TABLE) + 2) + "|"]
    for v, per_seed in stats.items():
        cells = [_mean_sd([st[k] for st in per_seed.values()], f) for k, _, f in TABLE]
        L.append(f"| {LABELS[v]} | {len(per_seed)} | " + " | ".join(cells) + " |")
    L += ["", "Fraction of response tokens each mechanism touches (mean over the steps that "
          "trained, then mean ± std over seeds; — where the variant does not use it). With "
          "GPPO and CISPO the clip column counts tokens past the ratio bounds, which keep a "
          "bounded or weighted gradient; DPPO's are masked (no gradient):", "",
          "| variant | " + " | ".join(lbl for lbl, _ in MECHANISMS.values())
          + " | touched (sum) |", "|---" * (len(MECHANISMS) + 2) + "|"]
    for v, per_seed in stats.items():
        on = mechanisms(v)
        cells = [_mean_sd([st[f"frac_{m}"] for st in per_seed.values()], "{:.2%}")
                 if m in on else "—" for m in MECHANISMS]
        L.append(f"| {LABELS[v]} | " + " | ".join(cells) + " | "
                 + _mean_sd([st["touched"] for st in per_seed.values()], "{:.2%}") + " |")
    base = stats.get(BASELINE)
    if base:
        L += ["", f"Paired by seed, variant − {LABELS[BASELINE]}: mean difference [bootstrap "
              "95% interval]:", "",
              "| variant | " + " | ".join(q[0] for q in QUANTITIES.values()) + " |",
              "|---" * (len(QUANTITIES) + 1) + "|"]
        for v, per_seed in stats.items():
            if v == BASELINE:
                continue
            cells = [fmt_interval(paired({s: st[k] for s, st in base.items()},
                                         {s: st[k] for s, st in per_seed.items()}), fmt)
                     for k, (_, fmt, _) in QUANTITIES.items()]
            L.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return L + [""]


def render_markdown(root: pathlib.Path, manifest: dict, runs: Runs, stats: dict) -> str:
    code = manifest.get("code", {})
    seeds = sorted({s for per_v in runs.values() for v in per_v.values() for s in v})
    L = ["# Ablation v2: ERC and its rivals, on- and off-policy, in a miniature", "",
         f"> Generated by `python -m {MODULE} report --out {rel(root)}` from the runs in "
         f"`{rel(root)}/` (code at commit `{code.get('commit', 'unknown')}`); do not edit by "
         "hand, regenerate. Commands: `" + manifest.get("command", f"python -m {MODULE} run")
         + f"`, then `python -m {MODULE} report --out {rel(root)}`.", ""]
    L += _setup(root, manifest, runs, seeds)
    L += ["## Results", "",
          f"Mean ± std over seeds (population std). *Entropy fluctuation* is the std of the "
          f"step-to-step change of the mean token entropy; a *grad-norm spike* a step whose "
          f"grad norm exceeds {SPIKE_K:g} x the run's median; a *collapsed* step one where "
          "every sampled group had equal rewards (nothing to train on). Paired differences: "
          f"per seed, variant minus {LABELS[BASELINE]} of the same regime; the interval is a "
          f"percentile bootstrap of the mean difference over the seed pairs ({BOOT_RESAMPLES} "
          f"resamples, RNG seed {BOOT_SEED}); none with a single seed.", ""]
    for r in runs:
        L += _regime_section(r, stats[r])
    L += ["## Reading (generated from the numbers above)", "",
          "A difference is called one only when its bootstrap interval excludes 0; otherwise "
          "the text says none is detectable, which is not evidence of no effect. "
          "Better/worse: higher accuracy, lower entropy fluctuation and fewer spikes are "
          "counted as better; the touched fraction has no better direction.", ""]
    for r in runs:
        L += reading(stats[r], BASELINE, LABELS, REGIME_LABELS[r]) + [""]
    L += ["## Wall time", ""]
    secs = [x["seconds"] for x in manifest.get("runs", {}).values() if "seconds" in x]
    total = sum(i.get("total_seconds") or 0 for i in manifest.get("invocations", []))
    if manifest:
        L.append(f"SFT warm start {manifest.get('sft_seconds') or '?'} s (once). RL runs "
                 + (f"{min(secs):.0f}-{max(secs):.0f} s each (mean {np.mean(secs):.0f} s), "
                    if secs else "")
                 + f"{manifest.get('jobs', '?')} at a time on a machine shared with other jobs; "
                 f"all RL runs {total or manifest.get('total_seconds', '?')} s wall time.")
    L += ["", "## Reproduce", "", "```bash", f"git checkout {code.get('commit', '<commit>')}",
          "# " + manifest.get("command", f"python -m {MODULE} run"),
          f"# python -m {MODULE} report --out {rel(root)}",
          "bash examples/ablation/run.sh   # the same with the default setting", "```", "",
          "One RL run by hand (what the runner executes per regime, variant and seed):", "",
          "```bash"]
    first = next(iter(manifest.get("runs", {}).values()), {})
    if first:
        L.append(first["command"].replace(str(REPO) + "/", ""))
    L += ["```", "", "## What this can and cannot show", "",
          "- A ~1M-parameter model on single-digit arithmetic with a 320-token vocabulary, "
          "trained for tens of steps on a CPU; the papers' runs are 1.5B-32B models on "
          "competition maths for hundreds of steps. Entropy dynamics of a tiny model on a toy "
          "task need not resemble those of a reasoning model.",
          "- Every rival runs at its paper's default hyper-parameters (listed above), untuned "
          "for this task; Clip-Cov and KL-Cov select a fixed small fraction of tokens, which "
          "on ~7-token responses is about one token per micro-batch.",
          f"- {len(seeds)} seed(s) per variant and regime; the bootstrap over so few seed "
          "pairs understates the uncertainty, and many intervals are computed at once.", ""]
    notes = REPO / "examples" / "ablation" / "conclusion.md"
    if notes.exists():  # hand-written reading of the recorded run (the numbers above rule)
        L += [notes.read_text().strip(), ""]
    return "\n".join(L)
