"""DAPO dynamic-sampling filter and overlong shaping against straightforward references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_erc.algorithms import (
    OverlongConfig,
    apply_overlong_shaping,
    dynamic_sampling_filter,
    overlong_penalty,
)

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(data=st.lists(st.tuples(st.sampled_from([0.0, 1.0, 0.5]), st.integers(0, 8)),
                     min_size=1, max_size=30))
def test_filter_matches_reference(data):
    rewards = [r for r, _ in data]
    groups = [g for _, g in data]
    by_group: dict[int, list[float]] = {}
    for r, g in data:
        by_group.setdefault(g, []).append(r)
    kept = sorted(g for g, rs in by_group.items() if len(set(rs)) > 1)
    result = dynamic_sampling_filter(torch.tensor(rewards), torch.tensor(groups))
    assert result.kept_group_ids.tolist() == kept
    assert result.num_kept_groups == len(kept)
    assert result.num_groups == len(by_group)
    assert result.keep.tolist() == [g in kept for g in groups]


def test_filter_exact_equality_and_singletons():
    rewards = torch.tensor([0.1 + 0.2, 0.3, 0.3, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([4, 4, 4, 2, 2, 2, 9])
    result = dynamic_sampling_filter(rewards, groups)
    # 0.1 + 0.2 != 0.3 in float64 but equal in float32: follows the tensor's values.
    assert result.num_kept_groups == 0 and not result.keep.any()
    result = dynamic_sampling_filter(rewards.double() + torch.tensor([1e-9, 0, 0, 0, 0, 0, 0]),
                                     groups)
    assert result.kept_group_ids.tolist() == [4]
    assert result.keep.tolist() == [True, True, True, False, False, False, False]


def ref_penalty(length: int, max_len: int, cache_len: int, factor: float) -> float:
    expected = max_len - cache_len
    if length <= expected:
        return 0.0
    if length >= max_len:
        return -factor
    return (expected - length) / cache_len * factor


@SETTINGS
@given(max_len=st.integers(1, 64), cache_frac=st.floats(0.01, 1.0), factor=st.floats(0, 3),
       lengths=st.lists(st.integers(0, 100), min_size=1, max_size=20))
def test_overlong_penalty_matches_reference(max_len, cache_frac, factor, lengths):
    cache_len = max(1, min(max_len, round(cache_frac * max_len)))
    cfg = OverlongConfig(max_len=max_len, cache_len=cache_len, factor=factor)
    got = overlong_penalty(torch.tensor(lengths), cfg)
    expected = torch.tensor([ref_penalty(n, max_len, cache_len, factor) for n in lengths])
    torch.testing.assert_close(got, expected)
    assert torch.all(got <= 0) and torch.all(got >= -factor)
    shaped = apply_overlong_shaping(torch.ones(len(lengths)), torch.tensor(lengths), cfg)
    torch.testing.assert_close(shaped, 1.0 + expected)


def test_overlong_penalty_dapo_values():
    cfg = OverlongConfig(max_len=20480, cache_len=4096)
    got = overlong_penalty(torch.tensor([100, 16384, 16385, 18432, 20480, 30000]), cfg)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_len=10, cache_len=11), "0 < cache_len <= max_len.*Lower cache_len"),
    (dict(max_len=10, cache_len=0), "0 < cache_len <= max_len"),
    (dict(max_len=0, cache_len=0), "max_len must be > 0"),
    (dict(max_len=10, cache_len=5, factor=-1.0), "factor must be >= 0"),
    (dict(max_len=10.5, cache_len=5), "max_len must be an int"),
])
def test_overlong_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OverlongConfig(**kwargs)


def test_shape_errors():
    cfg = OverlongConfig(max_len=10, cache_len=5)
    with pytest.raises(ValueError, match="same shape"):
        apply_overlong_shaping(torch.zeros(3), torch.zeros(2, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="same length"):
        dynamic_sampling_filter(torch.zeros(3), torch.zeros(2, dtype=torch.long))
