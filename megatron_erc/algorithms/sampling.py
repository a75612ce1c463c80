"""DAPO (Yu et al. 2025) rollout-side shaping: the dynamic-sampling group filter and the
overlong reward penalty. Pure tensor functions; the trainer owns the generate-until-full
loop (`train_batch_size`, `max_num_gen_batches`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_erc.algorithms.advantages import _check_rewards, group_index
from megatron_erc.algorithms.config import OverlongConfig


@dataclass(frozen=True)
class GroupFilterResult:
    """Outcome of `dynamic_sampling_filter` for `N` responses in `G` groups."""

    keep: Tensor
    """`[N]` bool: responses whose group survives."""

    kept_group_ids: Tensor
    """`[G_kept]` sorted ids of the surviving groups."""

    num_kept_groups: int
    """`G_kept`."""

    num_groups: int
    """`G`, so the trainer can log the kept fraction."""


def dynamic_sampling_filter(rewards: Tensor, group_ids: Tensor) -> GroupFilterResult:
    """Drop prompt groups whose rewards are all exactly equal (std == 0): they carry no
    GRPO advantage signal. Equality is exact (`max == min`), not a std threshold, so
    rounding in a std computation cannot keep a uniform group. A group of size 1 is
    uniform and is dropped.

    Args:
        rewards: `[N]` rewards (whatever the filter metric is, e.g. accuracy or score).
        group_ids: `[N]` integer prompt-group ids (any order).
    """
    _check_rewards(rewards, group_ids)
    unique_ids, inverse, _ = group_index(group_ids)
    num_groups = unique_ids.numel()
    init_max = torch.full((num_groups,), float("-inf"), dtype=torch.float64, device=rewards.device)
    r = rewards.detach().to(torch.float64)
    gmax = init_max.scatter_reduce(0, inverse, r, reduce="amax", include_self=True)
    gmin = (-init_max).scatter_reduce(0, inverse, r, reduce="amin", include_self=True)
    kept = gmax > gmin
    return GroupFilterResult(
        keep=kept[inverse],
        kept_group_ids=unique_ids[kept],
        num_kept_groups=int(kept.sum().item()),
        num_groups=num_groups,
    )


def overlong_penalty(lengths: Tensor, cfg: OverlongConfig) -> Tensor:
    """DAPO soft overlong punishment, `[N]` floats in `[-factor, 0]`:

        penalty = min(-(len - (L_max - L_cache)) / L_cache * factor, 0), clamped at -factor

    Args:
        lengths: `[N]` response lengths in tokens.
    """
    expected = cfg.max_len - cfg.cache_len
    over = lengths.to(torch.float64) - expected
    penalty = (-over / cfg.cache_len * cfg.factor).clamp(min=-cfg.factor, max=0.0)
    return penalty.to(torch.float32) + 0.0  # + 0.0 turns -0.0 into 0.0


def apply_overlong_shaping(rewards: Tensor, lengths: Tensor, cfg: OverlongConfig) -> Tensor:
    """`rewards + overlong_penalty(lengths)`, in `rewards`' floating dtype (`[N]`)."""
    if rewards.shape != lengths.shape:
        raise ValueError(
            f"rewards and lengths must have the same shape, got {tuple(rewards.shape)} and "
            f"{tuple(lengths.shape)}."
        )
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return rewards.to(out_dtype) + overlong_penalty(lengths, cfg).to(out_dtype)
