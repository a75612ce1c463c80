"""Small dataclass arguments for the pure algorithm functions.

One source of truth for the defaults: `PolicyLossConfig()` is DAPO (clip-higher, no ERC);
the ERC recipe sets `erc=ErcConfig()` (0.95 / 1.05, as in every published ERC run script),
`surrogate="gppo"`, `eps_high=0.2`, `dual_clip=10.0` and `pos_nll_coef=0.1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

SURROGATES = ("clip", "gppo", "cispo", "gspo", "sapo", "dppo")
REGULARIZERS = ("none", "clip_cov", "kl_cov")
_OWNED_FIELDS = {
    "sapo_tau_pos": "sapo", "sapo_tau_neg": "sapo",
    "dppo_delta_low": "dppo", "dppo_delta_high": "dppo",
    "clip_cov_frac": "clip_cov", "clip_cov_low": "clip_cov", "clip_cov_high": "clip_cov",
    "kl_cov_frac": "kl_cov", "kl_cov_coef": "kl_cov",
}
"""Fields that only act with one surrogate / regularizer: setting one for another is an error."""


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
    """The per-token policy-gradient surrogate (formulas and papers in
    `algorithms/surrogates.py` and the README table). `"clip"`: PPO/DAPO clip-higher,
    clipped tokens get no gradient. `"gppo"`: gradient-preserving clipping (Klear-Reasoner /
    CE-GPPO), same forward value on unclipped tokens, clipped tokens keep a bounded
    gradient. `"cispo"`: every token keeps the gradient of log pi, weighted by the clipped,
    detached ratio (MiniMax-M1). `"gspo"`: PPO clip on the sequence ratio
    `exp(mean_t(logp - old_logp))` (Qwen GSPO). `"sapo"`: a sigmoid soft gate instead of a
    hard clip (Qwen SAPO). `"dppo"`: no gradient where the sampled token's probability moved
    past a total-variation bound in the advantage's direction (DPPO binary-TV)."""

    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped below at `1 - eps_low` (for A < 0).
    Must be in [0, 1). Used by clip, gppo, cispo and gspo (on the sequence ratio, where the
    GSPO paper uses 3e-4); sapo and dppo have their own bounds and ignore it."""

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

    sapo_tau_pos: float = 1.0
    """SAPO gate temperature for A > 0 (Gao et al. 2025, arXiv 2511.20347, uses 1.0).
    Must be > 0; larger is a harder gate. Only used with `surrogate="sapo"`."""

    sapo_tau_neg: float = 1.05
    """SAPO gate temperature for A < 0 (the paper uses 1.05: negative tokens are gated
    faster). Must be > 0. Only used with `surrogate="sapo"`."""

    dppo_delta_low: float = 0.2
    """DPPO binary-TV bound for A < 0: a token whose sampled-token probability fell by more
    than this (`p - p_old < -delta_low`) gets no gradient. In (0, 1]. Only used with
    `surrogate="dppo"`. 0.2 is our default, not a value from the paper: tune it."""

    dppo_delta_high: float = 0.2
    """DPPO binary-TV bound for A > 0: no gradient where `p - p_old > delta_high`. In (0, 1].
    Only used with `surrogate="dppo"`."""

    regularizer: str = "none"
    """Covariance-selected token regularizer (Cui et al. 2025, arXiv 2505.22617) on top of the
    surrogate: `"none"`; `"clip_cov"` (a random `clip_cov_frac` of the tokens whose
    covariance `(A - mean A)(logp - mean logp)` lies in `[clip_cov_low, clip_cov_high]`
    lose their gradient); `"kl_cov"` (the top `kl_cov_frac` tokens by covariance get
    `+ kl_cov_coef * |logp - old_logp|`). See `algorithms/regularizers.py`."""

    clip_cov_frac: float = 2e-4
    """Clip-Cov: fraction of a micro-batch's response tokens detached (at least one when any
    token is in the band). In (0, 1]; the paper uses 2e-4. Only with `regularizer="clip_cov"`."""

    clip_cov_low: float = 1.0
    """Clip-Cov: lower edge of the covariance band (paper: 1).
    Only with `regularizer="clip_cov"`."""

    clip_cov_high: float = 5.0
    """Clip-Cov: upper edge of the covariance band (paper: 5); must be > clip_cov_low."""

    kl_cov_frac: float = 2e-3
    """KL-Cov: fraction of a micro-batch's response tokens (the highest covariance, at least
    one) that get the KL penalty. In (0, 1]; the paper uses 2e-3 (7B) and 2e-4 (32B).
    Only with `regularizer="kl_cov"`."""

    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient of `|logp - old_logp|` on the selected tokens (paper: 1). Must be
    > 0. Only with `regularizer="kl_cov"`."""

    entropy_coef: float = 0.0
    """Entropy bonus: `loss -= coef * token-mean(H_theta)` over all response tokens (not
    masked by ERC, clipping or 80/20). 0 disables it. Needs the entropy with gradient
    (the trainer asks for it when this is > 0). With `entropy_target` this is the largest
    coefficient the adaptive rule uses."""

    entropy_target: float | None = None
    """Target entropy (nats per token) of the adaptive entropy bonus: the coefficient used is
    `entropy_coef * max(0, 1 - H_mean / entropy_target)`, with `H_mean` the micro-batch's
    token-mean entropy, so the bonus fades out as the entropy reaches the target and is off
    above it. None: fixed coefficient. Must be > 0; needs `entropy_coef > 0`."""

    top_entropy_frac: float | None = None
    """80/20 (Wang et al. 2025, arXiv 2506.01939): the policy gradient flows only through
    the `ceil(frac * n)` highest-entropy response tokens of each micro-batch (n = its response
    tokens); the others keep their loss value but lose their gradient, like ERC. The paper
    uses 0.2. None disables it. In (0, 1]."""

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
    routing_replay: str = "none"
    """Mixture-of-experts models: ``"old"`` replays, in the update forwards of the off-policy
    mini-batches, the experts each router chose in the forward that scored their old
    log-probs, so the importance ratio and ERC's entropy ratio compare the same experts
    (MoE RL without it is unstable); ``"none"``: every forward routes by itself. Replaying
    the experts vLLM routed to during generation (``"rollout"``) is not built."""

    def __post_init__(self) -> None:
        if isinstance(self.erc, dict):
            self.erc = ErcConfig(**self.erc)
        if self.surrogate not in SURROGATES:
            raise ValueError(
                f"PolicyLossConfig.surrogate must be one of {SURROGATES}, got "
                f"{self.surrogate!r}. Use 'clip' for PPO/DAPO or 'gppo' for "
                f"gradient-preserving clipping; ERC is enabled separately via `erc=`, and "
                f"clip_cov / kl_cov via `regularizer=`."
            )
        if self.regularizer not in REGULARIZERS:
            raise ValueError(
                f"PolicyLossConfig.regularizer must be one of {REGULARIZERS}, got "
                f"{self.regularizer!r}. The entropy bonus (entropy_coef) and 80/20 "
                f"(top_entropy_frac) are separate fields that combine with any of these."
            )
        for name in ("eps_low", "eps_high", "gppo_beta_low", "gppo_beta_high", "pos_nll_coef",
                     *_OWNED_FIELDS, "entropy_coef"):
            _require_number(f"PolicyLossConfig.{name}", getattr(self, name))
        self._check_rivals()
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
        if self.routing_replay not in ("none", "old"):
            raise ValueError(
                f"PolicyLossConfig.routing_replay must be 'none' or 'old' (replay the scoring "
                f"forward's experts in the updates); got {self.routing_replay!r}")
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

    def _check_rivals(self) -> None:
        """The knobs of the other surrogates / regularizers: ranges, then that no knob is set
        for a method that is not selected (it would silently do nothing)."""
        positive = {"sapo_tau_pos": "1.0", "sapo_tau_neg": "1.05", "kl_cov_coef": "1.0"}
        for name, typical in positive.items():
            if not getattr(self, name) > 0.0:
                raise ValueError(f"PolicyLossConfig.{name} must be > 0; got "
                                 f"{getattr(self, name)}. The paper uses {typical}.")
        for name in ("dppo_delta_low", "dppo_delta_high", "clip_cov_frac", "kl_cov_frac"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(
                    f"PolicyLossConfig.{name} must be in (0, 1] (it is a probability "
                    f"difference or a fraction of tokens); got {getattr(self, name)}.")
        if not self.clip_cov_high > self.clip_cov_low:
            raise ValueError(
                f"PolicyLossConfig.clip_cov_high must be > clip_cov_low (the covariance band "
                f"is [low, high]); got low={self.clip_cov_low}, high={self.clip_cov_high}. "
                f"The paper uses 1 and 5.")
        defaults = {f.name: f.default for f in fields(self)}
        for name, owner in _OWNED_FIELDS.items():
            selected = self.surrogate if owner in SURROGATES else self.regularizer
            key = "surrogate" if owner in SURROGATES else "regularizer"
            if selected != owner and getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"PolicyLossConfig.{name}={getattr(self, name)} has no effect with "
                    f"{key}={selected!r}: set {key}={owner!r} or leave {name} at its default "
                    f"{defaults[name]}.")
        if self.entropy_coef < 0.0:
            raise ValueError(
                f"PolicyLossConfig.entropy_coef must be >= 0 (a bonus; a negative one would "
                f"push entropy down); got {self.entropy_coef}. Use 0 to disable it.")
        if self.entropy_target is not None:
            _require_number("PolicyLossConfig.entropy_target", self.entropy_target)
            if self.entropy_target <= 0.0:
                raise ValueError(
                    f"PolicyLossConfig.entropy_target must be > 0 (nats per token); got "
                    f"{self.entropy_target}. Use None for a fixed entropy coefficient.")
            if self.entropy_coef == 0.0:
                raise ValueError(
                    "PolicyLossConfig.entropy_target is set but entropy_coef is 0, so the "
                    "adaptive bonus would always be 0: set entropy_coef > 0 (the largest "
                    "coefficient), or entropy_target=None.")
        if self.top_entropy_frac is not None:
            _require_number("PolicyLossConfig.top_entropy_frac", self.top_entropy_frac)
            if not 0.0 < self.top_entropy_frac <= 1.0:
                raise ValueError(
                    f"PolicyLossConfig.top_entropy_frac must be in (0, 1] (the fraction of "
                    f"highest-entropy tokens that keep a gradient); got "
                    f"{self.top_entropy_frac}. The 80/20 paper uses 0.2; None disables it.")


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
