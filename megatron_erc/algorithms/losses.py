"""The policy loss: a surrogate (`surrogates.py`: clip, gppo, cispo, gspo, sapo, dppo) with
dual clip, TIS, ERC and the regularizers of `regularizers.py` (Clip-Cov, KL-Cov, 80/20,
entropy bonus) composed on top; and the positive-example NLL. Pure tensor math: no process
groups, no global state.

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
from megatron_erc.algorithms.regularizers import (
    clip_cov_mask,
    entropy_bonus_coef,
    kl_cov_mask,
    token_covariance,
    top_entropy_mask,
)
from megatron_erc.algorithms.surrogates import LOG_RATIO_CLAMP, log_ratio, surrogate_weights

RHO_QUANTILES = (0.05, 0.5, 0.95)
RHO_QUANTILE_NAMES = tuple(f"erc/ratio_p{round(q * 100):02d}" for q in RHO_QUANTILES)
NON_ADDITIVE_METRICS = frozenset(RHO_QUANTILE_NAMES)
POLICY_LOSS_METRICS = frozenset({
    "mismatch/kl", "tis/capped_frac", "tis/weight_mean", "erc/ratio_mean", "entropy/mean",
    "entropy/old_mean", "erc/dropped_frac", "erc/dropped_low_frac", "erc/dropped_high_frac",
    "clip/low_frac", "clip/high_frac", "clip/dual_frac", "kl/approx", "cov/selected_frac",
    "top_entropy/kept_frac", "entropy_bonus/coef"})
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
    segment_ids: Tensor | None = None,
    adv_mean: float | Tensor | None = None,
    seed: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean policy-gradient loss: `cfg.surrogate` with optional dual clip, TIS, ERC,
    Clip-Cov / KL-Cov, 80/20 and an entropy bonus.

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
        segment_ids: `[B, T]` int index of the sequence each token belongs to within its row
            (packed THD rows); None: one sequence per row. Only GSPO reads it.
        adv_mean: mean advantage over the mini-batch's response tokens (all micro-batches,
            all DP ranks) for the Clip-Cov / KL-Cov covariance; None: this micro-batch's.
        seed: seed of Clip-Cov's random pick (required with `regularizer="clip_cov"`; the
            same on every rank that holds this micro-batch).

    Entropy is needed by ERC, 80/20 and the entropy bonus; for the bonus it must carry a
    gradient (`logprobs_and_entropy(..., entropy_grad=True)`).

    Per token, with `r = exp(logp - old_logp)` (DAPO eq. 8, GPPO / CE-GPPO):
        clipped_low  = A < 0 and r < 1 - eps_low
        clipped_high = A > 0 and r > 1 + eps_high
        clip:  loss_tok = -A * {1 - eps_low | 1 + eps_high | r}
               (= max(-A*r, -A*clamp(r, 1-eps_low, 1+eps_high)))
        gppo:  loss_tok = -A * {beta1*(1-eps_low)*r/sg(r) | beta2*(1+eps_high)*r/sg(r) | r}
        cispo, gspo, sapo, dppo: loss_tok = -A * w, w from `surrogates.py`
        dual clip (A < 0):  loss_tok = min(-c*A, loss_tok)
        KL-Cov:             loss_tok += kl_cov_coef * |logp - old_logp| on the selected tokens
        TIS:                loss_tok *= sg(min(exp(old_logp - rollout_logp), tis_cap))
        ERC, 80/20, Clip-Cov: loss_tok = where(keep, loss_tok, sg(loss_tok)), keep the
                            intersection of the three masks
        loss = sum(mask * loss_tok) / num_tokens - coef * sum(mask * H_theta) / num_tokens

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
            tis/weight_mean (capped weight), tis/capped_frac;
          with a regularizer: cov/selected_frac (tokens Clip-Cov detached or KL-Cov
            penalised); with 80/20: top_entropy/kept_frac; with an entropy bonus:
            entropy_bonus/coef (the coefficient, token-weighted so it sums like the rest).
    """
    _check_same_shape(
        logp, old_logp=old_logp, mask=mask, entropy=entropy, old_entropy=old_entropy,
        rollout_logp=rollout_logp,
    )
    _check_inputs(cfg, logp, entropy, old_entropy, rollout_logp, seed)
    dtype = _compute_dtype(logp)
    mask = mask.bool()
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    adv = _broadcast_per_sequence(advantages.detach(), logp, "advantages").to(dtype)
    denom = _denominator(num_tokens, mask, dtype)
    metrics: dict[str, Tensor] = {}

    def token_mean(x: Tensor) -> Tensor:
        return (_token_sum(x.detach().to(dtype), mask) / denom).detach()

    weight, clipped_low, clipped_high = surrogate_weights(logp, old_logp, adv, mask, cfg,
                                                          segment_ids)
    loss_tok = -adv * weight

    dual = torch.zeros_like(mask)
    if cfg.dual_clip is not None:
        dual_bound = -cfg.dual_clip * adv
        dual = (adv < 0) & (loss_tok > dual_bound)
        loss_tok = torch.where(dual, dual_bound, loss_tok)

    keep = mask
    lr = log_ratio(logp, old_logp)
    if cfg.regularizer != "none":
        cov = token_covariance(adv, logp, mask, adv_mean)
        if cfg.regularizer == "kl_cov":
            selected = kl_cov_mask(cov, mask, cfg)
            loss_tok = loss_tok + torch.where(selected, cfg.kl_cov_coef * lr.abs(), 0.0)
        else:
            selected = clip_cov_mask(cov, mask, ~(clipped_low | clipped_high), cfg, seed)
            keep = keep & ~selected
        metrics["cov/selected_frac"] = token_mean(selected.to(dtype))

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
            keep = keep & erc_keep_mask(rho, mask, cfg.erc)
            dropped_low = token_mean((rho <= cfg.erc.low).to(dtype))
            dropped_high = token_mean((rho >= cfg.erc.high).to(dtype))
        metrics["erc/ratio_mean"] = token_mean(rho)
        metrics["entropy/mean"] = token_mean(entropy)
        metrics["entropy/old_mean"] = token_mean(old_entropy)
        for name, value in zip(
            RHO_QUANTILE_NAMES, quantiles(rho[mask], RHO_QUANTILES), strict=True
        ):
            metrics[name] = value.detach()
    if cfg.top_entropy_frac is not None:
        top = top_entropy_mask(entropy, mask, cfg.top_entropy_frac)
        keep = keep & top
        metrics["top_entropy/kept_frac"] = token_mean(top.to(dtype))
    if keep is not mask:
        loss_tok = stop_gradient_outside(loss_tok, keep)

    metrics["erc/dropped_frac"] = dropped_low + dropped_high
    metrics["erc/dropped_low_frac"] = dropped_low
    metrics["erc/dropped_high_frac"] = dropped_high
    metrics["clip/low_frac"] = token_mean(clipped_low.to(dtype))
    metrics["clip/high_frac"] = token_mean(clipped_high.to(dtype))
    metrics["clip/dual_frac"] = token_mean(dual.to(dtype))
    metrics["kl/approx"] = token_mean(torch.expm1(lr) - lr)

    loss = _token_sum(loss_tok, mask) / denom
    if cfg.entropy_coef:
        coef = entropy_bonus_coef(entropy.to(dtype), mask, cfg)
        loss = loss - coef * _token_sum(entropy.to(dtype), mask) / denom
        metrics["entropy_bonus/coef"] = token_mean(coef.expand_as(logp))
    return loss, metrics


def _check_inputs(cfg: PolicyLossConfig, logp: Tensor, entropy: Tensor | None,
                  old_entropy: Tensor | None, rollout_logp: Tensor | None,
                  seed: int | None) -> None:
    """Inputs the enabled switches need, with what to do when one is missing."""
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
    for on, what in ((cfg.top_entropy_frac is not None, "80/20 (cfg.top_entropy_frac)"),
                     (cfg.entropy_coef > 0, "the entropy bonus (cfg.entropy_coef)")):
        if on and entropy is None:
            raise ValueError(f"{what} is enabled but entropy was not given: pass the current "
                             f"policy's full-distribution entropy, or disable it.")
    if cfg.entropy_coef > 0 and logp.requires_grad and not entropy.requires_grad:
        raise ValueError(
            "the entropy bonus (cfg.entropy_coef > 0) needs the entropy's gradient, but "
            "entropy does not require grad: compute it with "
            "logprobs_and_entropy(..., entropy_grad=True), or set cfg.entropy_coef=0.")
    if cfg.regularizer == "clip_cov" and seed is None:
        raise ValueError(
            "Clip-Cov (cfg.regularizer='clip_cov') picks tokens at random and needs a seed: "
            "pass seed= (the same on every rank holding this micro-batch).")


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
