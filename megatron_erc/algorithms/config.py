"""Small dataclass arguments for the pure algorithm functions.

One source of truth for the defaults: `PolicyLossConfig()` is DAPO (clip-higher, no ERC);
the ERC recipe sets `erc=ErcConfig()` (0.95 / 1.05, as in every published ERC run script),
`surrogate="gppo"`, `eps_high=0.2`, `dual_clip=10.0` and `pos_nll_coef=0.1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SURROGATES = ("clip", "gppo")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _require_number(name: str, value: Any) -> None:
    if not _is_number(value):
        raise ValueError(f"{name} must be a real number, got {value!r}.")


@dataclass(kw_only=True)
class ErcConfig:
    """Entropy Ratio Clipping band (Su et al. 2025, arXiv 2512.05591).

    A response token keeps its gradient iff `low < rho < high` (strict), where
    `rho = (H_theta + 1e-8) / (H_old + 1e-8)` is the ratio of the current policy's
    full-distribution entropy to the rollout-time one.
    """

    low: float = 0.95
    """Lower bound on the entropy ratio; must be in [0, 1). Tokens with rho <= low are
    dropped from the gradient. 0 disables the lower side."""

    high: float = 1.05
    """Upper bound on the entropy ratio; must be > 1 (may be `math.inf` to disable the upper
    side). Tokens with rho >= high are dropped from the gradient."""

    def __post_init__(self) -> None:
        _require_number("ErcConfig.low", self.low)
        _require_number("ErcConfig.high", self.high)
        if not 0.0 <= self.low < 1.0:
            raise ValueError(
                f"ErcConfig.low must be in [0, 1) so that rho == 1 (an unchanged policy) "
                f"stays inside the band; got low={self.low}. The published runs use 0.95; "
                f"use 0 to disable the lower bound."
            )
        if not self.high > 1.0:
            raise ValueError(
                f"ErcConfig.high must be > 1 so that rho == 1 stays inside the band; got "
                f"high={self.high}. The published runs use 1.05; use math.inf to disable the "
                f"upper bound."
            )


@dataclass(kw_only=True)
class PolicyLossConfig:
    """Per-token policy-gradient surrogate, its clipping, and the masks composed on top."""

    surrogate: str = "clip"
    """`"clip"`: PPO/DAPO clip-higher, clipped tokens get no gradient. `"gppo"`:
    gradient-preserving clipping (Klear-Reasoner / CE-GPPO), same forward value on
    unclipped tokens, clipped tokens keep a bounded gradient."""

    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped below at `1 - eps_low` (for A < 0).
    Must be in [0, 1)."""

    eps_high: float = 0.28
    """Upper clip range: the ratio is clipped above at `1 + eps_high` (for A > 0).
    DAPO's clip-higher default is 0.28; the ERC + GPPO runs use 0.2. Must be >= 0."""

    dual_clip: float | None = None
    """Dual-clip constant `c > 1` for negative advantages: `loss_tok = min(-c*A, loss_tok)`
    where A < 0, with either surrogate. None disables it; the reference scripts use 10."""

    gppo_beta_low: float = 1.0
    """CE-GPPO beta1: scale of the preserved gradient on tokens with A < 0 and
    r < 1 - eps_low. 1.0 is plain GPPO; published CE-GPPO values are 0.5 / 0.75.
    Only used with `surrogate="gppo"`. Note (as in CE-GPPO) the forward value of those
    tokens is scaled by beta too, so it equals the clip surrogate's only when beta is 1."""

    gppo_beta_high: float = 1.0
    """CE-GPPO beta2: scale of the preserved gradient on tokens with A > 0 and
    r > 1 + eps_high. 1.0 is plain GPPO (and the published CE-GPPO value).
    Only used with `surrogate="gppo"`."""

    erc: ErcConfig | None = None
    """Entropy Ratio Clipping band composed on top of the surrogate; None disables ERC.
    When set, `policy_loss` requires `entropy` and `old_entropy`. A plain dict is converted
    to `ErcConfig` (handy for YAML)."""

    tis_cap: float | None = None
    """Truncated importance sampling cap for the train/inference mismatch:
    `loss_tok *= min(exp(old_logp - rollout_logp), tis_cap)` (weight detached). None
    disables it; when set, `policy_loss` requires `rollout_logp`. Must be > 0."""

    pos_nll_coef: float = 0.0
    """Coefficient of the positive-example NLL term (`losses.positive_nll`). Not applied by
    `policy_loss` (that term has its own token denominator): the trainer adds
    `pos_nll_coef * positive_nll(...)`. 0 disables it; the ERC recipe uses 0.1."""

    logprob_chunk_mb: int = 64
    """Memory budget (MiB) of the log-prob/entropy op's fp32 work buffers: tokens are
    processed in chunks sized so two fp32 `[chunk, V/tp]` buffers fit in it. Used by every
    training, scoring and SFT call; larger trades memory for fewer, bigger kernels."""

    def __post_init__(self) -> None:
        if isinstance(self.erc, dict):
            self.erc = ErcConfig(**self.erc)
        if self.surrogate not in SURROGATES:
            raise ValueError(
                f"PolicyLossConfig.surrogate must be one of {SURROGATES}, got "
                f"{self.surrogate!r}. Use 'clip' for PPO/DAPO or 'gppo' for "
                f"gradient-preserving clipping; ERC is enabled separately via `erc=`."
            )
        for name in ("eps_low", "eps_high", "gppo_beta_low", "gppo_beta_high", "pos_nll_coef"):
            _require_number(f"PolicyLossConfig.{name}", getattr(self, name))
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(
                f"PolicyLossConfig.eps_low must be in [0, 1) (the lower clip bound 1 - eps_low "
                f"must stay positive); got {self.eps_low}. DAPO uses 0.2."
            )
        if self.eps_high < 0.0:
            raise ValueError(
                f"PolicyLossConfig.eps_high must be >= 0; got {self.eps_high}. DAPO uses 0.28, "
                f"the GPPO runs 0.2."
            )
        if self.dual_clip is not None:
            _require_number("PolicyLossConfig.dual_clip", self.dual_clip)
            if self.dual_clip <= 1.0:
                raise ValueError(
                    f"PolicyLossConfig.dual_clip must be > 1 (it bounds -A*r at -c*A for A < 0); "
                    f"got {self.dual_clip}. Use None to disable it; the reference uses 10."
                )
        for name in ("gppo_beta_low", "gppo_beta_high"):
            value = getattr(self, name)
            if value < 0.0:
                raise ValueError(
                    f"PolicyLossConfig.{name} must be >= 0 (it scales a gradient that must "
                    f"keep its sign); got {value}. 1.0 is plain GPPO."
                )
            if self.surrogate != "gppo" and value != 1.0:
                raise ValueError(
                    f"PolicyLossConfig.{name}={value} has no effect with surrogate="
                    f"{self.surrogate!r}: set surrogate='gppo' or leave it at 1.0."
                )
        if self.erc is not None and not isinstance(self.erc, ErcConfig):
            raise ValueError(
                f"PolicyLossConfig.erc must be None, an ErcConfig or a dict of its fields; "
                f"got {type(self.erc).__name__}."
            )
        if self.tis_cap is not None:
            _require_number("PolicyLossConfig.tis_cap", self.tis_cap)
            if self.tis_cap <= 0.0:
                raise ValueError(
                    f"PolicyLossConfig.tis_cap must be > 0; got {self.tis_cap}. Use None to "
                    f"disable truncated importance sampling (typical caps are 2 to 10)."
                )
        if not isinstance(self.logprob_chunk_mb, int) or self.logprob_chunk_mb < 1:
            raise ValueError(
                f"PolicyLossConfig.logprob_chunk_mb must be an int >= 1 (MiB); got "
                f"{self.logprob_chunk_mb!r}. 64 bounds the buffers at 64 MiB per rank."
            )
        if self.pos_nll_coef < 0.0:
            raise ValueError(
                f"PolicyLossConfig.pos_nll_coef must be >= 0; got {self.pos_nll_coef}. Use 0 "
                f"to disable the positive-example NLL (the ERC recipe uses 0.1)."
            )


@dataclass(kw_only=True)
class OverlongConfig:
    """DAPO overlong reward shaping: a linear penalty over the last `cache_len` tokens
    before `max_len`, reaching `-factor` at `max_len` and staying there beyond."""

    max_len: int
    """L_max: the maximum response length (tokens). Must be > 0."""

    cache_len: int
    """L_cache: length of the soft-penalty buffer; penalties start after
    `max_len - cache_len` tokens. Must satisfy 0 < cache_len <= max_len."""

    factor: float = 1.0
    """Penalty magnitude at (and beyond) `max_len`. Must be >= 0."""

    def __post_init__(self) -> None:
        for name in ("max_len", "cache_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"OverlongConfig.{name} must be an int, got {value!r}.")
        _require_number("OverlongConfig.factor", self.factor)
        if self.max_len <= 0:
            raise ValueError(f"OverlongConfig.max_len must be > 0; got {self.max_len}.")
        if not 0 < self.cache_len <= self.max_len:
            raise ValueError(
                f"OverlongConfig.cache_len must satisfy 0 < cache_len <= max_len; got "
                f"cache_len={self.cache_len}, max_len={self.max_len}. Lower cache_len (DAPO "
                f"uses 4096 with max_len 20480), or do not apply overlong shaping at all."
            )
        if self.factor < 0.0:
            raise ValueError(
                f"OverlongConfig.factor must be >= 0 (it is a penalty magnitude); got "
                f"{self.factor}. DAPO uses 1.0."
            )
