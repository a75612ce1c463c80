"""The ablation report's statistics: the paired bootstrap against independent computations
(a hand-computed case, the exact bootstrap distribution by enumeration) and its properties,
and the generated "Reading" wording on synthetic results."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron_erc.studies.ablation_stats import (
    Paired,
    bootstrap_ci,
    paired,
    reading,
    reading_sentence,
)


def test_two_pairs_by_hand():
    # resampling [1, 3] twice: means 1 (p 1/4), 2 (p 1/2), 3 (p 1/4) -> 2.5% is 1, 97.5% is 3
    assert bootstrap_ci([1.0, 3.0]) == pytest.approx((1.0, 3.0))
    p = paired({0: 0.5, 1: 0.5}, {0: 1.5, 1: 3.5})
    assert (p.n, p.mean, p.higher, p.lower) == (2, 2.0, 2, 0)
    assert (p.low, p.high) == pytest.approx((1.0, 3.0))


def test_matches_the_exact_bootstrap_distribution():
    d = np.array([0.3, -0.1, 0.8, 0.2])
    # all 4^4 equally likely resamples: the exact distribution of the resampled mean
    means = np.sort([d[list(i)].mean() for i in itertools.product(range(4), repeat=4)])
    cdf = np.arange(1, means.size + 1) / means.size
    lo, hi = bootstrap_ci(d, resamples=20_000)
    # the Monte-Carlo quantiles sit where the exact CDF crosses 2.5% / 97.5% (+- MC noise)
    assert np.interp(lo, means, cdf) == pytest.approx(0.025, abs=0.012)
    assert np.interp(hi, means, cdf) == pytest.approx(0.975, abs=0.012)


def test_pairs_by_seed_and_skips_missing_or_nan():
    base = {0: 0.1, 1: 0.2, 2: float("nan"), 3: 0.4}
    other = {0: 0.3, 1: 0.1, 2: 0.9, 5: 0.0}
    p = paired(base, other)
    assert p.n == 2 and p.mean == pytest.approx((0.2 - 0.1) / 2)
    assert paired({0: 1.0}, {1: 1.0}) is None
    one = paired({0: 1.0}, {0: 2.0})
    assert one.n == 1 and np.isnan(one.low) and np.isnan(one.high)


def test_interval_contains_the_mean_and_shrinks_with_more_seeds():
    rng = np.random.default_rng(123)
    for _ in range(20):
        d = rng.normal(0.5, 1.0, size=5)
        lo, hi = bootstrap_ci(d)
        assert lo <= d.mean() <= hi
    widths = {}
    for n in (5, 20, 80):
        d = rng.normal(0.5, 1.0, size=n)
        lo, hi = bootstrap_ci(d)
        widths[n] = hi - lo
    assert widths[5] > widths[20] > widths[80]
    # deterministic: a fixed RNG seed gives the same interval every time
    assert bootstrap_ci([0.1, 0.4, -0.2]) == bootstrap_ci([0.1, 0.4, -0.2])


def test_reading_wording():
    zero_in = Paired(n=5, mean=0.01, low=-0.02, high=0.04, higher=3, lower=2)
    s = reading_sentence("DAPO+ERC", "DAPO", "val_final", zero_in)
    assert "no difference detectable" in s and "better" not in s and "worse" not in s
    better = Paired(n=5, mean=0.05, low=0.02, high=0.08, higher=5, lower=0)
    s = reading_sentence("CISPO", "DAPO", "val_final", better)
    assert "higher (better)" in s and "excludes 0" in s
    s = reading_sentence("CISPO", "DAPO", "grad_spikes", better)
    assert "higher (worse)" in s
    s = reading_sentence("CISPO", "DAPO", "touched", better)
    assert "higher," in s and "better" not in s and "worse" not in s
    few = Paired(n=2, mean=0.3, low=0.2, high=0.4, higher=2, lower=0)
    assert "too few paired seeds" in reading_sentence("GPPO", "DAPO", "val_final", few)
    assert "no paired seeds" in reading_sentence("GPPO", "DAPO", "val_final", None)


def _stats(values: dict[int, float]) -> dict[int, dict]:
    return {s: {"val_final": v, "entropy_fluct": 0.01, "grad_spikes": 0, "touched": 0.01}
            for s, v in values.items()}


def test_reading_on_synthetic_results():
    labels = {"dapo": "DAPO", "same": "SAME", "up": "UP"}
    stats = {"dapo": _stats({s: 0.5 + 0.01 * s for s in range(5)}),
             "same": _stats({s: 0.5 + 0.01 * s + (-1) ** s * 0.01 for s in range(5)}),
             "up": _stats({s: 0.6 + 0.01 * s for s in range(5)})}
    text = "\n".join(reading(stats, "dapo", labels, "8 updates per rollout"))
    assert text.startswith("At 8 updates per rollout: 1 of 8 paired intervals exclude 0: "
                           "UP (final validation accuracy).")
    assert "UP vs DAPO, final validation accuracy: higher (better), +10.0% [+10.0%, +10.0%]" \
        in text
    assert "SAME vs DAPO, final validation accuracy: no difference detectable" in text
    assert "SAME vs DAPO, grad-norm spikes: no difference detectable (+0.0 [+0.0, +0.0]" in text
    nothing = {k: stats[k] for k in ("dapo", "same")}
    text = "\n".join(reading(nothing, "dapo", labels, "2 updates per rollout"))
    assert "none of the 4 paired intervals excludes 0" in text
    one_seed = {k: {0: v[0]} for k, v in nothing.items()}
    text = "\n".join(reading(one_seed, "dapo", labels, "2 updates per rollout"))
    assert "nothing to say" in text and "too few paired seeds (1)" in text
