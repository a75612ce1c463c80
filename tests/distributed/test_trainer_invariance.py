"""Token-mean over the global token count: the policy loss and its gradients do not change
with the micro-batch split or the data-parallel size; a non-finite step is skipped."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.distributed.harness import run_distributed, run_each
from tests.distributed.trainer_cases import grads_for_split

# Every one-rank case runs in one world (harness.run_each); the group keeps the module on
# one xdist worker so that world starts once.
pytestmark = pytest.mark.xdist_group("trainer_invariance")
CASES = "tests.distributed.trainer_cases:"
ONE_RANK = {  # name -> (rank function, its arguments)
    "ref": ("grads_for_split", (16,)),                # one micro-batch, DP=1
    "split4": ("grads_for_split", (4,)),              # four micro-batches
    "nonfinite": ("nonfinite_step_is_skipped", ()),
    "double_counted": ("grads_after_a_step_are_not_double_counted", ()),
    "lr_schedule": ("lr_schedule", ()),
    "onpolicy": ("onpolicy_old_logprobs_from_the_update_forward", ()),
}


@functools.cache
def one_rank() -> dict:
    calls = [(CASES + fn, args) for fn, args in ONE_RANK.values()]
    return dict(zip(ONE_RANK, run_distributed(run_each, 1, calls, timeout=900)[0], strict=True))


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def test_loss_and_grads_invariant_to_micro_batch_split_and_dp():
    ref, split4 = one_rank()["ref"], one_rank()["split4"]
    dp2 = run_distributed(grads_for_split, 2, 4)              # DP=2, two micro-batches each
    assert 0.0 < ref["erc_dropped"] < 1.0, "the case must exercise the ERC mask"
    assert math.isclose(split4["loss"], ref["loss"], rel_tol=1e-5)
    assert _max_rel(split4["grads"], ref["grads"]) < 1e-5
    for r in dp2:
        assert math.isclose(r["loss"], ref["loss"], rel_tol=1e-5), (r["loss"], ref["loss"])
        assert _max_rel(r["grads"], ref["grads"]) < 1e-5
    # and the check can fail: a different batch gives different gradients
    assert any(not torch.allclose(ref["grads"][k], 0 * ref["grads"][k]) for k in ref["grads"])


def test_nonfinite_loss_skips_the_step_and_keeps_weights():
    r = one_rank()["nonfinite"]
    assert not r["applied"] and not math.isfinite(r["norm"]) and r["unchanged"]
    assert r["applied2"] and math.isfinite(r["norm2"]) and r["changed"]


def test_gradients_after_an_optimizer_step_are_not_double_counted():
    assert one_rank()["double_counted"] == 0.0


def test_warmup_then_cosine_decay_schedule():
    lrs = one_rank()["lr_schedule"]
    # optimizer steps 0..7: warmup over 2 steps to 1e-3, cosine over 4 steps to 1e-4
    assert lrs[0] == 0.0 and math.isclose(lrs[1], 5e-4) and math.isclose(lrs[2], 1e-3)
    assert all(a > b for a, b in zip(lrs[2:6], lrs[3:7], strict=False))
    assert math.isclose(lrs[6], 1e-4) and math.isclose(lrs[7], 1e-4)


def test_first_minibatch_old_logprobs_from_its_own_forward_match_a_scoring_pass():
    r = one_rank()["onpolicy"]
    assert r["logp"] <= 1e-6 and r["entropy"] <= 1e-6, r
    assert math.isclose(*r["loss"], rel_tol=1e-6, abs_tol=1e-9), r
    assert r["grad_scale"] > 0 and r["grads"] <= 1e-6 * r["grad_scale"], r
