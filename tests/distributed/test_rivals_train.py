"""Every surrogate and regularizer switch through the real RL loop (``run_train``, one rank,
the tiny task, one step of two mini-batches): the trainer passes what each needs (packed
segment ids for GSPO, Clip-Cov's seed, the mini-batch's mean advantage, the entropy's
gradient for the bonus) and its metrics come out. The math itself is checked against float64
references in tests/unit/test_rivals.py."""

from __future__ import annotations

import math

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.rl_cases import rl_run

PARITY = ["rollout.reward_fn=tests.e2e.rewards:parity_reward"]
PACKED = ["run.pack_sequences=true", "run.max_tokens_per_micro_batch=40"]
RUNS = {  # name -> overrides on top of examples/tiny/dapo_erc.yaml (ERC, dual clip on)
    "cispo_clipcov_bonus": ["algo.surrogate=cispo", "algo.regularizer=clip_cov",
                            "algo.clip_cov_frac=0.1", "algo.clip_cov_low=-100",
                            "algo.clip_cov_high=100", "algo.entropy_coef=0.01",
                            "algo.tis_cap=2.0"],
    "gspo_packed_klcov_8020": ["algo.surrogate=gspo", "algo.eps_low=0.05",
                               "algo.eps_high=0.05", "algo.regularizer=kl_cov",
                               "algo.kl_cov_frac=0.1", "algo.top_entropy_frac=0.2",
                               *PACKED],
    "sapo_adaptive_bonus": ["algo.surrogate=sapo", "algo.entropy_coef=0.01",
                            "algo.entropy_target=100"],
    "dppo": ["algo.surrogate=dppo", "algo.dppo_delta_low=1e-5", "algo.dppo_delta_high=1e-5"],
    # GSPO's sequence ratio over packed rows needs each token's segment: packed and unpacked
    # must train the same step (one ratio per row would not)
    "gspo": ["algo.surrogate=gspo", "algo.eps_low=0.01", "algo.eps_high=0.01"],
    "gspo_packed": ["algo.surrogate=gspo", "algo.eps_low=0.01", "algo.eps_high=0.01",
                    "run.pack_sequences=true", "run.max_tokens_per_micro_batch=120"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_erc.cli.demo import prepare

    task = tmp_path_factory.mktemp("task")
    prepare(task, seed=0)
    runs = [(str(tmp_path_factory.mktemp(name)), PARITY + extra)
            for name, extra in RUNS.items()]
    out = run_distributed(rl_run, 1, str(task), runs, timeout=900)[0]
    return {name: r["history"][0] for name, r in zip(RUNS, out, strict=True)}


@pytest.mark.parametrize("name", list(RUNS))
def test_switch_trains_end_to_end(results, name):
    row = results[name]
    assert row.get("skipped_steps", 0.0) == 0.0
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    if "clipcov" in name or "klcov" in name:
        assert 0.0 < row["cov/selected_frac"] <= 0.3, row["cov/selected_frac"]
    if "8020" in name:  # ceil(0.2 n) per micro-batch: at least 20%, a little more
        assert 0.2 <= row["top_entropy/kept_frac"] < 0.4, row["top_entropy/kept_frac"]
    if "bonus" in name:  # far below a target of 100 nats: the adaptive coefficient ~ 0.01
        assert 0.009 < row["entropy_bonus/coef"] <= 0.01, row["entropy_bonus/coef"]
    if name == "dppo":  # a tight bound: the masks act
        assert row["clip/low_frac"] + row["clip/high_frac"] > 0


def test_gspo_packed_trains_the_unpacked_step(results):
    plain, packed = results["gspo"], results["gspo_packed"]
    assert plain["clip/low_frac"] + plain["clip/high_frac"] > 0  # sequences were clipped
    for k in ("loss", "grad_norm", "clip/low_frac", "clip/high_frac"):
        assert math.isclose(plain[k], packed[k], rel_tol=1e-5, abs_tol=1e-9), (k, plain[k],
                                                                              packed[k])
