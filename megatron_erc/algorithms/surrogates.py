"""Per-token policy-gradient surrogates, all in one form: `loss_tok = -A * w`.

`w` is a `[B, T]` tensor whose *value* is the token's effective importance weight and whose
*gradient* carries the surrogate's gradient (a straight-through factor `r / sg(r)` or
`exp(logp - sg(logp))` has value 1 and gradient `grad log pi`). One form lets `policy_loss`
compose every surrogate with dual clip, TIS, ERC, the covariance regularizers, 80/20 and the
global token-mean the same way. Pure tensor math: no process groups, no global state.

Notation: `r = exp(logp - old_logp)` (log-ratio clamped to +-LOG_RATIO_CLAMP), `A` the
advantage, `sg` = detach, `eps_low / eps_high` the clip ranges of `PolicyLossConfig`.

    clip   w = r, or the bound 1-eps_low (A<0) / 1+eps_high (A>0) past it (no gradient)
           DAPO, arXiv 2503.14476
    gppo   as clip, but a clipped token keeps beta*(1+-eps)*r/sg(r)
           Klear-Reasoner arXiv 2508.07629, CE-GPPO arXiv 2509.20712
    cispo  w = sg(clip(r, 1-eps_low, 1+eps_high)) * exp(logp - sg(logp))
           MiniMax-M1, arXiv 2506.13585
    gspo   w = sg(s_i) * exp(logp - sg(logp)), PPO-clipped on s_i = exp(mean_t(logp - old))
           GSPO, arXiv 2507.18071
    sapo   w = (4/tau) * sigmoid(tau * (r - 1)), tau_pos (A>0) / tau_neg (A<0)
           SAPO, arXiv 2511.20347
    dppo   w = r, no gradient where A>0, p-p_old > delta_high or A<0, p-p_old < -delta_low
           DPPO, arXiv 2602.04879

Each function returns `(w, low, high)`: `low` / `high` are bool `[B, T]` masks of the tokens
the method clipped or masked on the lower / upper side (for the `clip/low_frac` and
`clip/high_frac` metrics, and so that Clip-Cov skips tokens already clipped).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_erc.algorithms.config import PolicyLossConfig

LOG_RATIO_CLAMP = 20.0
"""|logp - old_logp| is clamped here before exp (as verl does) so that a single diverged
token gives a large finite ratio instead of inf/NaN. Tokens beyond it get no gradient."""

Weights = tuple[Tensor, Tensor, Tensor]


def log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """`[B, T]` clamped `logp - old_logp` (gradient through `logp` inside the clamp)."""
    return (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _straight_through(logp: Tensor) -> Tensor:
    """Value 1, gradient `grad logp`."""
    return torch.exp(logp - logp.detach())


def clip_weights(ratio: Tensor, adv: Tensor, cfg: PolicyLossConfig) -> Weights:
    """PPO / DAPO clip-higher (DAPO eq. 8): `-A*w = max(-A*r, -A*clamp(r, 1-eps_low,
    1+eps_high))`; with `surrogate="gppo"` the bounds keep the gradient of log pi, scaled by
    CE-GPPO's beta1 (A<0) / beta2 (A>0)."""
    low = (adv < 0) & (ratio < 1.0 - cfg.eps_low)
    high = (adv > 0) & (ratio > 1.0 + cfg.eps_high)
    if cfg.surrogate == "gppo":
        straight_through = ratio / ratio.detach()
        bound_low = cfg.gppo_beta_low * (1.0 - cfg.eps_low) * straight_through
        bound_high = cfg.gppo_beta_high * (1.0 + cfg.eps_high) * straight_through
    else:
        bound_low = torch.full_like(ratio, 1.0 - cfg.eps_low)
        bound_high = torch.full_like(ratio, 1.0 + cfg.eps_high)
    return torch.where(low, bound_low, torch.where(high, bound_high, ratio)), low, high


def cispo_weights(logp: Tensor, ratio: Tensor, cfg: PolicyLossConfig) -> Weights:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): `loss_tok = -sg(clip(r, 1-eps_low,
    1+eps_high)) * A * logp`: the weight is clipped, never the gradient, so every token
    keeps `grad log pi`. Here the value is `-A * sg(clip(r))` (the same gradient; the loss
    value is then comparable with PPO's instead of scaling with log pi). MiniMax clips only
    above (a large eps_low); `low` / `high` flag the clipped weights whatever the sign of A.
    """
    low, high = ratio < 1.0 - cfg.eps_low, ratio > 1.0 + cfg.eps_high
    clipped = ratio.detach().clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    return clipped * _straight_through(logp), low, high


def sequence_index(mask: Tensor, segment_ids: Tensor | None) -> tuple[Tensor, int]:
    """`([B, T] int64 sequence index, number of indices)`: one index per (row, segment).

    `segment_ids` `[B, T]` numbers the sequences packed into a row (THD layout); None means
    one sequence per row."""
    b, t = mask.shape
    rows = torch.arange(b, device=mask.device).unsqueeze(-1).expand(b, t)
    if segment_ids is None:
        return rows, b
    if segment_ids.shape != mask.shape:
        raise ValueError(f"segment_ids must have the shape of logp {tuple(mask.shape)}, got "
                         f"{tuple(segment_ids.shape)}.")
    seg = segment_ids.long()
    per_row = int(seg.max().item()) + 1 if seg.numel() else 1
    return rows * per_row + seg, b * per_row


def sequence_mean(x: Tensor, mask: Tensor, segment_ids: Tensor | None) -> Tensor:
    """`[B, T]`: the mean of `x` over the response tokens of each token's sequence."""
    index, n = sequence_index(mask, segment_ids)
    index = index.reshape(-1)
    m = mask.reshape(-1).to(x.dtype)
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, index, x.reshape(-1) * m)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, index, m)
    return (total / count.clamp_min(1.0))[index].view_as(x)


def gspo_weights(logp: Tensor, lr: Tensor, adv: Tensor, mask: Tensor, cfg: PolicyLossConfig,
                 segment_ids: Tensor | None) -> Weights:
    """GSPO-token (Zheng et al. 2025, arXiv 2507.18071, eqs. 5-7 and 10-11): the sequence
    ratio `s_i = exp(mean_{t in i}(logp - old_logp))` over sequence i's response tokens,
    PPO-clipped at `[1-eps_low, 1+eps_high]` with the sign of A, and per token
    `w = sg(s_i) * exp(logp_t - sg(logp_t))`: value s_i, gradient `s_i * grad log pi_t`.

    With the advantage constant over a sequence, `sum_t` of these token losses equals
    `|y_i|` times GSPO's sequence loss, value and gradient: the global token-mean thus
    weighs each sequence by its length, where the paper averages sequences (`1/|y_i|`).
    A token-level ERC / 80/20 mask then removes single tokens from that gradient.
    """
    seq_log_ratio = sequence_mean(lr.detach(), mask, segment_ids)
    s = torch.exp(seq_log_ratio)
    low = (adv < 0) & (s < 1.0 - cfg.eps_low)
    high = (adv > 0) & (s > 1.0 + cfg.eps_high)
    bound = torch.where(low, torch.full_like(s, 1.0 - cfg.eps_low),
                        torch.full_like(s, 1.0 + cfg.eps_high))
    return torch.where(low | high, bound, s * _straight_through(logp)), low, high


def sapo_weights(ratio: Tensor, adv: Tensor, cfg: PolicyLossConfig) -> Weights:
    """SAPO (Gao et al. 2025, arXiv 2511.20347): the soft gate
    `loss_tok = -(4/tau) * sigmoid(tau * (r - 1)) * A`, with `tau = tau_pos` for A > 0 and
    `tau_neg` for A < 0. Its gradient `-4 sigmoid(x)(1 - sigmoid(x)) r A grad log pi`
    (`x = tau (r - 1)`) equals PPO's `-A grad log pi` at r = 1 and fades smoothly to 0 as r
    leaves 1, instead of a hard cut; the weight is bounded by `4 / tau`. Nothing is hard
    clipped: `low` / `high` are all False."""
    tau = torch.where(adv > 0, torch.full_like(ratio, cfg.sapo_tau_pos),
                      torch.full_like(ratio, cfg.sapo_tau_neg))
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)), none, none


def dppo_weights(logp: Tensor, old_logp: Tensor, ratio: Tensor, adv: Tensor,
                 cfg: PolicyLossConfig) -> Weights:
    """DPPO binary-TV (Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement
    Learning", arXiv 2602.04879): the trust region is the sampled token's probability shift
    `p - p_old` (`p = exp(logp)`), the binary approximation of the total variation. A token
    gets no gradient where it left the region in the direction A pushes it:
    `A > 0 and p - p_old > delta_high` or `A < 0 and p - p_old < -delta_low`; every other
    token has the unclipped `-A * r`. Masked tokens keep their value (like PPO-clip's). The
    old policy here is the one that scored the rollout batch (`old_logp`); the paper's
    behaviour policy is the sampler, which TIS corrects for."""
    shift = torch.exp(logp.detach()) - torch.exp(old_logp)
    high = (adv > 0) & (shift > cfg.dppo_delta_high)
    low = (adv < 0) & (shift < -cfg.dppo_delta_low)
    return torch.where(low | high, ratio.detach(), ratio), low, high


def surrogate_weights(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                      cfg: PolicyLossConfig, segment_ids: Tensor | None = None) -> Weights:
    """`(w, low, high)` of `cfg.surrogate` (all `[B, T]`); `old_logp` and `adv` detached."""
    lr = log_ratio(logp, old_logp)
    ratio = torch.exp(lr)
    if cfg.surrogate in ("clip", "gppo"):
        return clip_weights(ratio, adv, cfg)
    if cfg.surrogate == "cispo":
        return cispo_weights(logp, ratio, cfg)
    if cfg.surrogate == "gspo":
        return gspo_weights(logp, lr, adv, mask, cfg, segment_ids)
    if cfg.surrogate == "sapo":
        return sapo_weights(ratio, adv, cfg)
    if cfg.surrogate == "dppo":
        return dppo_weights(logp, old_logp, ratio, adv, cfg)
    raise ValueError(f"unknown surrogate {cfg.surrogate!r}")
