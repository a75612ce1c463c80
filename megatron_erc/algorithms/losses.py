"""Policy-gradient surrogates (DAPO clip-higher, GPPO / CE-GPPO), dual clip, TIS, ERC, and
the positive-example NLL. Pure tensor math: no process groups, no global state.

Token-mean aggregation: every loss here is `sum(mask * loss_tok) / num_tokens`, where
`num_tokens` is the *global* number of response tokens of the mini-batch (across
micro-batches and data-parallel ranks). Summing the micro-batch losses then gives the
full-batch loss regardless of the split. When `num_tokens` is None the local `mask.sum()`
is used.

Metrics follow the same rule, so they aggregate exactly like the loss: every metric not in
`NON_ADDITIVE_METRICS` is `sum over response tokens of x / num_tokens` (this micro-batch's
share of the global token-mean): sum it over micro-batches and all-reduce SUM over DP.
The ones in `NON_ADDITIVE_METRICS` are quantiles over this micro-batch's response tokens
(average or max them across micro-batches; that is an approximation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_erc.algorithms.config import PolicyLossConfig
from megatron_erc.algorithms.erc import (
    entropy_ratio,
    erc_keep_mask,
    quantiles,
    stop_gradient_outside,
)

LOG_RATIO_CLAMP = 20.0
"""|logp - old_logp| is clamped here before exp (as verl does) so that a single diverged
token gives a large finite ratio instead of inf/NaN. Tokens beyond it get no gradient."""

RHO_QUANTILES = (0.05, 0.5, 0.95)
RHO_QUANTILE_NAMES = tuple(f"erc/ratio_p{round(q * 100):02d}" for q in RHO_QUANTILES)
NON_ADDITIVE_METRICS = frozenset(RHO_QUANTILE_NAMES)
POLICY_LOSS_METRICS = frozenset({
    "mismatch/kl", "tis/capped_frac", "tis/weight_mean", "erc/ratio_mean", "entropy/mean",
    "entropy/old_mean", "erc/dropped_frac", "erc/dropped_low_frac", "erc/dropped_high_frac",
    "clip/low_frac", "clip/high_frac", "clip/dual_frac", "kl/approx"})
"""The additive (per-global-token) metrics `policy_loss` may return."""


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _broadcast_per_sequence(x: Tensor, like: Tensor, name: str) -> Tensor:
    """Accept `x` of shape `like.shape` (per token) or `like.shape[:-1]` (per sequence,
    e.g. `[B]` for `[B, T]`, broadcast over the last dim)."""
    if x.shape == like.shape:
        return x
    if like.dim() >= 1 and x.shape == like.shape[:-1]:
        return x.unsqueeze(-1).expand_as(like)
    raise ValueError(
        f"{name} must have shape {tuple(like.shape)} (per token) or {tuple(like.shape[:-1])} "
        f"(per sequence), got {tuple(x.shape)}."
    )


def _denominator(num_tokens: int | float | Tensor | None, mask: Tensor, dtype: torch.dtype):
    """Token-mean denominator, at least 1 so an all-padding batch gives a loss of 0."""
    if num_tokens is None:
        return mask.sum().to(dtype).clamp_min(1.0)
    if isinstance(num_tokens, Tensor):
        return num_tokens.detach().to(dtype=dtype, device=mask.device).clamp_min(1.0)
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0 (a global token count), got {num_tokens}.")
    return max(float(num_tokens), 1.0)


def _token_sum(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _check_same_shape(ref: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(
                f"{name} must have the shape of logp {tuple(ref.shape)}, got {tuple(t.shape)}."
            )


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: PolicyLossConfig,
    entropy: Tensor | None = None,
    old_entropy: Tensor | None = None,
    rollout_logp: Tensor | None = None,
    num_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean policy-gradient loss with optional dual clip, TIS and ERC.

    Args:
        logp: `[B, T]` log pi_theta of the sampled tokens (the only input with gradient).
        old_logp: `[B, T]` log-probs under the policy that scored the rollout batch.
        advantages: `[B, T]` per token, or `[B]` per sequence (broadcast over T). More
            generally: `logp.shape` or `logp.shape[:-1]`.
        mask: `[B, T]` response mask (bool, or 0/1: nonzero counts as a response token).
            Padding positions may hold any finite values.
        cfg: surrogate and clipping settings.
        entropy, old_entropy: `[B, T]` full-distribution entropies of the current / rollout
            scoring policy. Required when `cfg.erc` is set; if given without ERC they are
            only used for metrics. No gradient flows through them.
        rollout_logp: `[B, T]` log-probs from the inference engine. Required when
            `cfg.tis_cap` is set; otherwise only used for the `mismatch/kl` metric.
        num_tokens: token-mean denominator: the global count of response tokens of the
            mini-batch (all micro-batches, all DP ranks). Defaults to `mask.sum()`.

    Per token, with `r = exp(logp - old_logp)` (DAPO eq. 8, GPPO / CE-GPPO):
        clipped_low  = A < 0 and r < 1 - eps_low
        clipped_high = A > 0 and r > 1 + eps_high
        clip:  loss_tok = -A * {1 - eps_low | 1 + eps_high | r}
               (= max(-A*r, -A*clamp(r, 1-eps_low, 1+eps_high)))
        gppo:  loss_tok = -A * {beta1*(1-eps_low)*r/sg(r) | beta2*(1+eps_high)*r/sg(r) | r}
        dual clip (A < 0):  loss_tok = min(-c*A, loss_tok)
        TIS:                loss_tok *= sg(min(exp(old_logp - rollout_logp), tis_cap))
        ERC:                loss_tok = where(keep, loss_tok, sg(loss_tok))
        loss = sum(mask * loss_tok) / num_tokens

    Returns:
        `(loss, metrics)`: a 0-d loss and detached 0-d tensor metrics (see module docstring
        for their denominators):
          clip/low_frac, clip/high_frac: clipped_low / clipped_high tokens (with GPPO these
            keep a bounded gradient instead of none);
          clip/dual_frac: tokens where the dual-clip bound is active (0 if disabled);
          kl/approx: k3 estimator `r - 1 - log r` of KL(old || theta);
          erc/dropped_frac, erc/dropped_low_frac (rho <= low), erc/dropped_high_frac
            (rho >= high): 0 when ERC is disabled;
          with entropies: erc/ratio_mean, entropy/mean, entropy/old_mean, and the
            non-additive erc/ratio_p05, erc/ratio_p50, erc/ratio_p95;
          with rollout_logp: mismatch/kl (k3 of KL(rollout || old)); with tis_cap:
            tis/weight_mean (capped weight), tis/capped_frac.
    """
    _check_same_shape(
        logp, old_logp=old_logp, mask=mask, entropy=entropy, old_entropy=old_entropy,
        rollout_logp=rollout_logp,
    )
    if cfg.erc is not None and (entropy is None or old_entropy is None):
        raise ValueError(
            "ERC is enabled (cfg.erc is set) but entropy/old_entropy were not given: compute "
            "the full-distribution entropy in both the rollout scoring pass and the training "
            "forward pass, or set cfg.erc=None."
        )
    if cfg.tis_cap is not None and rollout_logp is None:
        raise ValueError(
            "Truncated importance sampling is enabled (cfg.tis_cap is set) but rollout_logp "
            "was not given: pass the inference engine's log-probs, or set cfg.tis_cap=None."
        )
    dtype = _compute_dtype(logp)
    mask = mask.bool()
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    adv = _broadcast_per_sequence(advantages.detach(), logp, "advantages").to(dtype)
    denom = _denominator(num_tokens, mask, dtype)
    metrics: dict[str, Tensor] = {}

    def token_mean(x: Tensor) -> Tensor:
        return (_token_sum(x.detach().to(dtype), mask) / denom).detach()

    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    clipped_low = (adv < 0) & (ratio < 1.0 - cfg.eps_low)
    clipped_high = (adv > 0) & (ratio > 1.0 + cfg.eps_high)
    if cfg.surrogate == "clip":
        bound_low = torch.full_like(ratio, 1.0 - cfg.eps_low)
        bound_high = torch.full_like(ratio, 1.0 + cfg.eps_high)
    else:
        # Value 1, gradient grad(log pi): the clipped token keeps a bounded gradient.
        straight_through = ratio / ratio.detach()
        bound_low = cfg.gppo_beta_low * (1.0 - cfg.eps_low) * straight_through
        bound_high = cfg.gppo_beta_high * (1.0 + cfg.eps_high) * straight_through
    surrogate_ratio = torch.where(clipped_high, bound_high, ratio)
    loss_tok = -adv * torch.where(clipped_low, bound_low, surrogate_ratio)

    dual = torch.zeros_like(mask)
    if cfg.dual_clip is not None:
        dual_bound = -cfg.dual_clip * adv
        dual = (adv < 0) & (loss_tok > dual_bound)
        loss_tok = torch.where(dual, dual_bound, loss_tok)

    if rollout_logp is not None:
        mismatch = (old_logp - rollout_logp.detach().to(dtype)).clamp(
            -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
        )
        metrics["mismatch/kl"] = token_mean(torch.expm1(mismatch) - mismatch)
        if cfg.tis_cap is not None:
            weight = torch.exp(mismatch)
            metrics["tis/capped_frac"] = token_mean((weight > cfg.tis_cap).to(dtype))
            weight = weight.clamp(max=cfg.tis_cap)
            metrics["tis/weight_mean"] = token_mean(weight)
            loss_tok = loss_tok * weight

    zero = torch.zeros((), dtype=dtype, device=logp.device)
    dropped_low = dropped_high = zero
    if entropy is not None and old_entropy is not None:
        rho = entropy_ratio(entropy.to(dtype), old_entropy.to(dtype))
        if cfg.erc is not None:
            keep = erc_keep_mask(rho, mask, cfg.erc)
            loss_tok = stop_gradient_outside(loss_tok, keep)
            dropped_low = token_mean((rho <= cfg.erc.low).to(dtype))
            dropped_high = token_mean((rho >= cfg.erc.high).to(dtype))
        metrics["erc/ratio_mean"] = token_mean(rho)
        metrics["entropy/mean"] = token_mean(entropy)
        metrics["entropy/old_mean"] = token_mean(old_entropy)
        for name, value in zip(
            RHO_QUANTILE_NAMES, quantiles(rho[mask], RHO_QUANTILES), strict=True
        ):
            metrics[name] = value.detach()

    metrics["erc/dropped_frac"] = dropped_low + dropped_high
    metrics["erc/dropped_low_frac"] = dropped_low
    metrics["erc/dropped_high_frac"] = dropped_high
    metrics["clip/low_frac"] = token_mean(clipped_low.to(dtype))
    metrics["clip/high_frac"] = token_mean(clipped_high.to(dtype))
    metrics["clip/dual_frac"] = token_mean(dual.to(dtype))
    metrics["kl/approx"] = token_mean(torch.expm1(log_ratio) - log_ratio)

    loss = _token_sum(loss_tok, mask) / denom
    return loss, metrics


def positive_token_mask(mask: Tensor, positive: Tensor) -> Tensor:
    """Bool `[B, T]`: response tokens of positive (correct) responses.

    `positive` is `[B]` (or `mask.shape`): a bool mask, or rewards, in which case a
    response is positive iff its reward is exactly 1. Use this to count the global
    denominator for `positive_nll`.
    """
    if positive.dtype != torch.bool:
        positive = positive == 1
    return mask.bool() & _broadcast_per_sequence(positive, mask, "positive")


def positive_nll(
    logp: Tensor,
    mask: Tensor,
    positive: Tensor,
    *,
    num_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """Positive-example NLL of the ERC runs: token-mean of `-logp` over the response tokens
    of responses whose reward is exactly 1. Neither clipped nor ERC-masked.

    Args:
        logp: `[B, T]` log pi_theta of the sampled tokens.
        mask: `[B, T]` response mask.
        positive: `[B]` bool mask of positive responses, or `[B]` rewards (positive iff
            exactly 1). Also accepted per token (`[B, T]`).
        num_tokens: denominator: the global count of positive response tokens
            (`positive_token_mask(...).sum()` over all micro-batches and DP ranks).
            Defaults to the local count. With no positive token the loss is 0.

    Returns the unscaled 0-d loss; the caller multiplies by `PolicyLossConfig.pos_nll_coef`.
    """
    _check_same_shape(logp, mask=mask)
    pos = positive_token_mask(mask, positive)
    dtype = _compute_dtype(logp)
    return _token_sum(-logp.to(dtype), pos) / _denominator(num_tokens, pos, dtype)
