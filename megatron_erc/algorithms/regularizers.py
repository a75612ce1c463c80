"""Token selection and bonus terms composed on top of any surrogate by `policy_loss`:
Clip-Cov, KL-Cov, 80/20 and the entropy bonus. Pure tensor math: no process groups.

    Clip-Cov   a random `clip_cov_frac` of the tokens with `clip_cov_low <= cov <=
               clip_cov_high` (not already clipped) lose their gradient.
               Cui et al. 2025, arXiv 2505.22617, sec. 5
    KL-Cov     the top `kl_cov_frac` tokens by `cov` get `+ kl_cov_coef * |logp - old_logp|`.
               Same paper.
    80/20      only the `ceil(top_entropy_frac * n)` highest-entropy tokens keep a gradient.
               Wang et al. 2025, arXiv 2506.01939
    entropy    `loss -= coef * token-mean(H_theta)`; adaptive:
    bonus      `coef = entropy_coef * max(0, 1 - H_mean / entropy_target)` (a proportional
               take on Skywork-OR1's adaptive entropy control, arXiv 2505.22312)

with the centred covariance `cov = (A - mean A) * (logp - mean logp)` (logp of the current
policy, detached).

Statistics and the scale of a run. The loss is a global token-mean over a mini-batch spread
over micro-batches and data-parallel ranks, but one forward sees one micro-batch. What is
global and what is per micro-batch:
  - `mean A`: global when the caller passes `adv_mean` (the trainer does: the advantages
    are known before the forward, one all-reduce per mini-batch); otherwise the
    micro-batch's.
  - `mean logp`, the token counts behind `clip_cov_frac`, `kl_cov_frac` and
    `top_entropy_frac`, and `H_mean` of the adaptive bonus: per micro-batch (the current
    policy's log-probs and entropies of the other micro-batches do not exist yet). Each
    micro-batch thus selects its own share; on a 64-GPU run the selected tokens are the
    union of every rank's per-micro-batch picks, about the same fraction of the global
    tokens (the verl reference computes all of it per micro-batch too).
  - Clip-Cov's random pick draws from a generator seeded by the caller (`seed`), never from
    the global RNG: tensor-parallel ranks hold the same micro-batch and must pick the same
    tokens or their gradients disagree; the trainer derives the seed from `run.seed`, the
    optimizer step, the data-parallel rank and the micro-batch index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_erc.algorithms.config import PolicyLossConfig


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def _count(frac: float, n: int) -> int:
    """`ceil(frac * n)`, robust to float noise (0.3 * 10 is 3.0000000000000004)."""
    return math.ceil(round(frac * n, 9))


def _top_k(scores: Tensor, eligible: Tensor, k: int) -> Tensor:
    """Bool mask of the `k` highest `scores` among `eligible` (fewer if fewer are)."""
    selected = torch.zeros_like(eligible)
    k = min(k, eligible.numel())
    if k <= 0:
        return selected
    masked = torch.where(eligible, scores, torch.full_like(scores, -math.inf))
    idx = masked.reshape(-1).topk(k).indices
    selected.view(-1)[idx] = True
    return selected & eligible


def token_covariance(adv: Tensor, logp: Tensor, mask: Tensor,
                     adv_mean: float | Tensor | None = None) -> Tensor:
    """`[B, T]` centred covariance `(A - mean A) * (logp - mean logp)`, detached; means over
    the response tokens (`mean A` is `adv_mean` when given: the global mini-batch mean)."""
    adv, logp = adv.detach(), logp.detach()
    a_mean = _masked_mean(adv, mask) if adv_mean is None else torch.as_tensor(
        adv_mean, dtype=adv.dtype, device=adv.device)
    return (adv - a_mean) * (logp - _masked_mean(logp, mask))


def clip_cov_mask(cov: Tensor, mask: Tensor, eligible: Tensor, cfg: PolicyLossConfig,
                  seed: int) -> Tensor:
    """Clip-Cov: bool `[B, T]` tokens whose gradient is removed. Among the response tokens in
    `eligible` (the trainer passes those the surrogate did not already clip) with
    `clip_cov_low <= cov <= clip_cov_high`, pick `max(1, floor(clip_cov_frac * n))`
    uniformly at random (n: the micro-batch's response tokens), or all of them if fewer.
    The pick is a function of `seed` alone (a CPU generator), identical on every rank
    that passes the same seed."""
    band = mask & eligible & (cov >= cfg.clip_cov_low) & (cov <= cfg.clip_cov_high)
    n = int(mask.sum().item())
    if n == 0:
        return torch.zeros_like(band)
    k = max(1, int(cfg.clip_cov_frac * n))
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % 2**63)
    priority = torch.rand(mask.shape, generator=gen, dtype=torch.float64).to(cov.device)
    return _top_k(priority, band, k)


def kl_cov_mask(cov: Tensor, mask: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """KL-Cov: bool `[B, T]`, the `max(1, floor(kl_cov_frac * n))` response tokens with the
    largest covariance (n: the micro-batch's response tokens)."""
    n = int(mask.sum().item())
    return _top_k(cov, mask, max(1, int(cfg.kl_cov_frac * n)) if n else 0)


def top_entropy_mask(entropy: Tensor, mask: Tensor, frac: float) -> Tensor:
    """80/20: bool `[B, T]`, exactly `ceil(frac * n)` of the `n` response tokens, those with
    the highest entropy (ties broken arbitrarily but the count is exact)."""
    n = int(mask.sum().item())
    return _top_k(entropy.detach(), mask.bool(), _count(frac, n))


def entropy_bonus_coef(entropy: Tensor, mask: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """0-d coefficient of the entropy bonus: `entropy_coef`, or with `entropy_target`
    `entropy_coef * max(0, 1 - H_mean / entropy_target)` (`H_mean`: the micro-batch's
    token-mean entropy, detached). A proportional controller: stateless, so nothing has to
    be checkpointed, unlike Skywork-OR1's integral rule that steps a stored coefficient."""
    coef = torch.tensor(cfg.entropy_coef, dtype=entropy.dtype, device=entropy.device)
    if cfg.entropy_target is None:
        return coef
    h_mean = _masked_mean(entropy.detach(), mask)
    return coef * (1.0 - h_mean / cfg.entropy_target).clamp_min(0.0)
