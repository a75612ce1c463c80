"""The ablation report's statistics: paired differences against the baseline with bootstrap
intervals, and the generated "Reading" sentences. Pure numpy on ``{seed: value}`` dicts, so
it is unit-tested on synthetic numbers (``tests/unit/test_ablation_stats.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOT_RESAMPLES = 10_000
BOOT_SEED = 0
"""The bootstrap's fixed RNG seed: the report is the same every time it is regenerated."""

QUANTITIES = {  # stat -> (what, format of a value, higher is better: True / False / None)
    "val_final": ("final validation accuracy", "{:+.1%}", True),
    "entropy_fluct": ("entropy fluctuation", "{:+.4f}", False),
    "grad_spikes": ("grad-norm spikes", "{:+.1f}", False),
    "touched": ("fraction of tokens touched", "{:+.2%}", None),
}
"""The four quantities compared with the baseline, paired by seed."""


@dataclass
class Paired:
    """``variant - baseline`` over the seeds both finished (NaNs dropped)."""

    n: int
    mean: float
    low: float  # bootstrap 95% interval of the mean difference (nan when n < 2)
    high: float
    higher: int  # seeds where the variant is above / below the baseline
    lower: int


def bootstrap_ci(diffs, resamples: int = BOOT_RESAMPLES, seed: int = BOOT_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``: resample the seed pairs with
    replacement ``resamples`` times, take the mean of each resample, return the
    ``(1-level)/2`` and ``(1+level)/2`` quantiles. ``(nan, nan)`` for fewer than 2 pairs."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired(base: dict[int, float], other: dict[int, float],
           resamples: int = BOOT_RESAMPLES) -> Paired | None:
    """Paired difference ``other - base`` by seed; None when no seed has both values."""
    seeds = sorted(s for s in set(base) & set(other)
                   if _finite(base[s]) and _finite(other[s]))
    if not seeds:
        return None
    d = np.array([other[s] - base[s] for s in seeds], dtype=float)
    lo, hi = bootstrap_ci(d, resamples)
    return Paired(n=len(seeds), mean=float(d.mean()), low=lo, high=hi,
                  higher=int((d > 0).sum()), lower=int((d < 0).sum()))


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt_interval(p: Paired | None, fmt: str) -> str:
    """``+1.2% [-0.5%, +2.9%]`` (n/a without pairs; no interval with one pair)."""
    if p is None:
        return "n/a"
    if p.n < 2:
        return f"{fmt.format(p.mean)} (1 seed)"
    return f"{fmt.format(p.mean)} [{fmt.format(p.low)}, {fmt.format(p.high)}]"


def reading_sentence(label: str, base_label: str, key: str, p: Paired | None) -> str:
    """One conservative sentence about ``variant - baseline`` for quantity ``key``: a
    difference is only called one when the bootstrap interval excludes 0."""
    what, fmt, higher_better = QUANTITIES[key]
    if p is None:
        return f"{label} vs {base_label}, {what}: no paired seeds."
    if p.n < 3:
        return (f"{label} vs {base_label}, {what}: {fmt_interval(p, fmt)}, too few paired "
                f"seeds ({p.n}) to say anything.")
    ci = fmt_interval(p, fmt)
    if p.low <= 0.0 <= p.high:
        return (f"{label} vs {base_label}, {what}: no difference detectable "
                f"({ci}, {p.n} seeds; higher in {p.higher}, lower in {p.lower}).")
    direction = "higher" if p.mean > 0 else "lower"
    if higher_better is None:
        judgement = ""
    else:
        good = (p.mean > 0) == higher_better
        judgement = " (better)" if good else " (worse)"
    return (f"{label} vs {base_label}, {what}: {direction}{judgement}, "
            f"{ci}, {p.n} seeds; higher in {p.higher}, lower in {p.lower}; the interval "
            f"excludes 0.")


def reading(stats: dict[str, dict[int, dict]], baseline: str, labels: dict[str, str],
            regime_label: str) -> list[str]:
    """The generated "Reading" bullets of one regime: for every variant and quantity, what
    the paired interval allows one to say, then the caveats that apply to all of them."""
    base = stats.get(baseline, {})
    lines = []
    n_intervals = 0
    detected = []
    for v, per_seed in stats.items():
        if v == baseline:
            continue
        for key in QUANTITIES:
            p = paired({s: st[key] for s, st in base.items()},
                       {s: st[key] for s, st in per_seed.items()})
            if p is not None and p.n >= 3:
                n_intervals += 1
                if not p.low <= 0.0 <= p.high:
                    detected.append(f"{labels[v]} ({QUANTITIES[key][0]})")
            lines.append("- " + reading_sentence(labels[v], labels[baseline], key, p))
    if not n_intervals:
        verdict = "no variant has 3 or more seeds paired with the baseline: nothing to say."
    elif detected:
        verdict = (f"{len(detected)} of {n_intervals} paired intervals exclude 0: "
                   + "; ".join(detected) + ".")
    else:
        verdict = (f"none of the {n_intervals} paired intervals excludes 0: no variant differs "
                   f"detectably from {labels[baseline]} on any of the four quantities.")
    head = [f"At {regime_label}: {verdict}"]
    if n_intervals:
        head.append(f"With {n_intervals} intervals at 95%, about {0.05 * n_intervals:.1f} "
                    "would exclude 0 by chance alone, and a percentile bootstrap over a "
                    "handful of seeds is narrower than it should be: treat a single "
                    "excluded interval as a lead to re-run with more seeds, not as a finding.")
    return head + [""] + lines
