"""The RL step at any layout: one global batch per step, decided the same way on every rank.

World 1, DP=2, TP=2, PP=2 and DP=2 x TP=2 run the real loop (``run_train``, embedded engines, one
per rank, per-prompt sampling seeds). Step 1 must train the same prompts with the same loss and
gradient norm everywhere; with a reward that makes some groups all-equal, data-parallel
replicas still run the same optimizer steps and micro-batches; a step that keeps nothing is
skipped by every rank together (this hung before: replicas decided on their own).
"""

from __future__ import annotations

import math

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.rl_cases import rl_run

HALF = ["rollout.reward_fn=tests.e2e.rewards:half_constant_reward"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from megatron_erc.cli.demo import prepare

    root = tmp_path_factory.mktemp("task")
    prepare(root, seed=0)
    return str(root)


def _step1(result: dict) -> dict:
    row = result["history"][0]
    return {"kept": result["kept"][0], "loss": row["loss"], "grad_norm": row["grad_norm"]}


def _same_step1(a: dict, b: dict) -> None:
    assert a["kept"] == b["kept"], "a different set of prompts was trained on"
    for k in ("loss", "grad_norm"):
        assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, a[k], b[k])


# token-budget micro-batches of packed (THD) rows: a budget of 40 tokens splits the step's
# sequences (up to ~30 tokens each) into more, differently filled micro-batches
PACKED = ["run.pack_sequences=true", "run.max_tokens_per_micro_batch=40"]


@pytest.fixture(scope="module")
def world1_runs(task, tmp_path_factory):
    d = tmp_path_factory.mktemp("w1")
    return run_distributed(rl_run, 1, task, [(str(d / "a"), HALF + ["run.steps=1"]),
                                             (str(d / "b"), HALF + ["run.steps=1"] + PACKED)])[0]


@pytest.fixture(scope="module")
def world1(world1_runs):
    return world1_runs[0]


def test_token_budget_and_packing_leave_the_step_unchanged(world1_runs):
    plain, packed = world1_runs
    _same_step1(_step1(plain), _step1(packed))
    assert packed["micro_batches"] > plain["micro_batches"]  # the budget did split differently


def test_dp2_one_global_batch_equal_steps_and_a_joint_skip(task, tmp_path, world1):
    runs = [(str(tmp_path / "half"), HALF + ["run.steps=3"]),
            (str(tmp_path / "const"),
             ["rollout.reward_fn=tests.e2e.rewards:constant_reward", "run.steps=1",
              "rollout.max_gen_batches=2"]),
            (str(tmp_path / "packed"), HALF + ["run.steps=1"] + PACKED)]
    ranks = run_distributed(rl_run, 2, task, runs, timeout=600)
    half = [r[0] for r in ranks]
    rows = half[0]["history"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["dynamic_sampling/groups_kept"] <= 4  # prompts_per_step for the whole job
    # some group was dropped, so replicas deciding alone would have diverged
    assert any(r["dynamic_sampling/groups_kept"] < 4 or r["dynamic_sampling/rounds"] > 1
               for r in rows)
    assert half[0]["kept"] == half[1]["kept"], "replicas must agree on the global batch"
    assert half[0]["optimizer_steps"] == half[1]["optimizer_steps"] > 0
    assert half[0]["micro_batches"] == half[1]["micro_batches"] > 0
    _same_step1(_step1(world1), _step1(half[0]))
    packed = [r[2] for r in ranks]  # budget + packing at DP=2: still the one-rank step
    _same_step1(_step1(world1), _step1(packed[0]))
    assert packed[0]["micro_batches"] == packed[1]["micro_batches"]
    const = [r[1] for r in ranks]
    for c in const:  # nothing kept: every rank skips the update together
        assert c["history"][0]["skipped_steps"] == 1.0 and c["optimizer_steps"] == 0
        assert c["history"][0]["dynamic_sampling/rounds"] == 2


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_tp2_or_pp2_trains_the_same_step_as_one_rank(task, tmp_path, world1, layout):
    # pp=2 also runs the fixed-shape micro-batches (filler rows) and the stage broadcast of
    # the weight sync
    # and, in the same world, packed rows under a token budget (pp=2: one row length per
    # pipeline)
    runs = [(str(tmp_path / "mp2"), HALF + ["run.steps=1", layout]),
            (str(tmp_path / "mp2_packed"), HALF + ["run.steps=1", layout] + PACKED)]
    ranks = run_distributed(rl_run, 2, task, runs, timeout=600)
    for i in range(len(runs)):
        _same_step1(_step1(world1), _step1(ranks[0][i]))
        assert ranks[0][i]["kept"] == ranks[1][i]["kept"]


def test_dp2_x_tp2_runs_two_steps(task, tmp_path, world1):
    ranks = run_distributed(rl_run, 4, task,
                            [(str(tmp_path / "dp2tp2"), HALF + ["run.steps=2", "parallel.tp=2"])],
                            timeout=900)
    rows = ranks[0][0]["history"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert len({r[0]["optimizer_steps"] for r in ranks}) == 1
    _same_step1(_step1(world1), _step1(ranks[0][0]))
