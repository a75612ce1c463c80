"""Entropy Ratio Clipping (Su et al. 2025, arXiv 2512.05591): one mask over any surrogate.

    rho(t)  = (H_theta(t) + 1e-8) / (H_old(t) + 1e-8)
    keep(t) = mask(t) and low < rho(t) < high
    loss_tok(t) <- where(keep, loss_tok, sg(loss_tok))

Out-of-band tokens keep their loss value (and their place in the token-mean denominator)
but contribute no gradient. The entropies only feed a mask, so no gradient flows through
them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_erc.algorithms.config import ErcConfig

ENTROPY_EPS = 1e-8


def entropy_ratio(entropy: Tensor, old_entropy: Tensor) -> Tensor:
    """`rho = (H_theta + 1e-8) / (H_old + 1e-8)`, detached. Shapes `[B, T]` (any, equal)."""
    if entropy.shape != old_entropy.shape:
        raise ValueError(
            f"entropy and old_entropy must have the same shape, got {tuple(entropy.shape)} "
            f"and {tuple(old_entropy.shape)}."
        )
    with torch.no_grad():
        return (entropy + ENTROPY_EPS) / (old_entropy + ENTROPY_EPS)


def erc_keep_mask(rho: Tensor, mask: Tensor, cfg: ErcConfig) -> Tensor:
    """Bool `[B, T]`: response tokens whose entropy ratio is strictly inside the band."""
    return mask.bool() & (rho > cfg.low) & (rho < cfg.high)


def stop_gradient_outside(loss_tok: Tensor, keep: Tensor) -> Tensor:
    """Same values as `loss_tok`; gradient only where `keep`."""
    return torch.where(keep, loss_tok, loss_tok.detach())


def quantiles(values: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """Nearest-rank quantiles of a 1-D tensor (NaN when empty). Sort-based, so unlike
    `torch.quantile` it has no input-size limit."""
    if values.numel() == 0:
        nan = torch.full((), float("nan"), dtype=values.dtype, device=values.device)
        return [nan for _ in qs]
    ordered = values.sort().values
    last = values.numel() - 1
    return [ordered[round(q * last)] for q in qs]
