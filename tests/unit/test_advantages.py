"""GRPO advantages against a float64 per-group loop (statistics.stdev is the unbiased std)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_erc.algorithms import group_index, grpo_advantages

SETTINGS = settings(max_examples=40, deadline=None)


def ref_grpo(rewards: list[float], groups: list[int]) -> list[float]:
    out = []
    for r, g in zip(rewards, groups, strict=True):
        members = [x for x, h in zip(rewards, groups, strict=True) if h == g]
        mean = sum(members) / len(members)
        std = statistics.stdev(members) if len(members) > 1 else 0.0
        out.append((r - mean) / (std + 1e-6))
    return out


@SETTINGS
@given(data=st.lists(st.tuples(st.sampled_from([0.0, 1.0, 0.5, -0.25]) | st.floats(-3, 3),
                               st.integers(-5, 40)), min_size=1, max_size=30))
def test_matches_reference_unequal_groups(data):
    rewards = [r for r, _ in data]
    groups = [g for _, g in data]
    adv = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups))
    assert adv.shape == (len(data),) and adv.dtype == torch.float64
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, torch.tensor(ref_grpo(rewards, groups), dtype=torch.float64))


def test_binary_rewards_float32_and_interleaved_ids():
    rewards = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1])
    groups = torch.tensor([7, 2, 7, 2, 7, 9, 2, 7])
    adv = grpo_advantages(rewards, groups)
    assert adv.dtype == torch.float32
    expected = ref_grpo(rewards.double().tolist(), groups.tolist())
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))
    # Group 7 = [1, 0, 1, 1]: mean 0.75, unbiased std 0.5.
    assert math.isclose(float(adv[0]), 0.25 / (0.5 + 1e-6), rel_tol=1e-6)


def test_singleton_and_uniform_groups_are_zero_not_nan():
    rewards = torch.tensor([0.7, 1.0, 1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 1, 1, 1, 2, 2])
    adv = grpo_advantages(rewards, groups)
    assert torch.all(adv[:4] == 0)
    assert adv[4] < 0 < adv[5]


def test_gradcheck_and_no_nan_gradient_at_zero_std():
    rewards = torch.tensor([0.1, 0.9, 0.4, -1.0, 2.0, 0.3], dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda r: grpo_advantages(r, groups), (rewards,))
    uniform = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    grpo_advantages(uniform, torch.tensor([0, 0, 1])).sum().backward()
    assert torch.isfinite(uniform.grad).all()


def test_group_index_and_errors():
    unique, inverse, counts = group_index(torch.tensor([5, 3, 5, 5]))
    assert unique.tolist() == [3, 5] and inverse.tolist() == [1, 0, 1, 1]
    assert counts.tolist() == [1, 3]
    with pytest.raises(ValueError, match="same length"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        group_index(torch.zeros(2, 2, dtype=torch.long))
