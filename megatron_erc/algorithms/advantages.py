"""GRPO group-normalised advantages (Shao et al. 2024), as used by DAPO and the ERC runs.

    A_i = (R_i - mean_g(R)) / (std_g(R) + 1e-6)     (unbiased std over group g of i)

Group sizes come from the data (`group_ids`), so groups may have unequal sizes (e.g. after
failed generations are dropped). The advantage is per response; `policy_loss` broadcasts a
`[B]` advantage to every response token.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRPO_EPS = 1e-6


def group_index(group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(unique_ids [G], inverse [N], counts [G])` for arbitrary (unsorted, non-contiguous)
    integer group ids `[N]`; `unique_ids` is sorted."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [N], got shape {tuple(group_ids.shape)}.")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}.")
    return torch.unique(group_ids, sorted=True, return_inverse=True, return_counts=True)


def _check_rewards(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of the same length [N], got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}."
        )


def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = GRPO_EPS) -> Tensor:
    """Per-response GRPO advantages.

    Args:
        rewards: `[N]` scalar reward of each response.
        group_ids: `[N]` integer id of the prompt each response answers (any order).
        eps: added to the group std.

    Returns `[N]` advantages in `rewards`' dtype (float32 for integer rewards), computed
    in float64. A group of size 1 has an undefined unbiased std: its advantage is 0 (its
    reward equals its mean), never NaN. Groups with all-equal rewards also get 0.
    Differentiable w.r.t. `rewards` (no NaN gradient at std == 0), though GRPO never
    needs it.
    """
    _check_rewards(rewards, group_ids)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    _, inverse, counts = group_index(group_ids)
    r = rewards.to(torch.float64)
    n = counts.to(torch.float64)
    num_groups = counts.numel()
    mean = r.new_zeros(num_groups).index_add(0, inverse, r) / n
    centered = r - mean[inverse]
    sq = r.new_zeros(num_groups).index_add(0, inverse, centered * centered)
    var = sq / (n - 1).clamp_min(1.0)
    # sqrt'(0) is inf: keep the unused branch finite so all-equal groups get zero gradient.
    std = torch.where(var > 0, var.clamp_min(torch.finfo(torch.float64).tiny).sqrt(), 0.0)
    return (centered / (std[inverse] + eps)).to(out_dtype)
