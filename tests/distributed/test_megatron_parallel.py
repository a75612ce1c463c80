"""Parallel correctness: every TP/PP/VPP/SP/DP split equals the single-process model.

Weights are copied from a single-process reference; logits (true vocabulary) and every
parameter gradient (after megatron's DDP reduction) must match it to ~1e-5 relative.
The tiny model's vocabulary (509) is not divisible by 2 or 4, so vocab padding is covered.
"""

from __future__ import annotations

import functools
import json
import pathlib

import pytest

from tests.distributed.harness import RankFailed, run_distributed, run_each
from tests.distributed.megatron_cases import MICRO_BATCHES, run_case

TOL = 1e-5
TINY = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())
TINY.pop("architectures"), TINY.pop("torch_dtype")
TIED_LLAMA = dict(TINY, model_type="llama", tie_word_embeddings=True)
TIED_LLAMA.pop("rope_theta")
# TP=4 needs 4 key/value heads (the tiny config has 2, for vLLM's CPU head_dim of 32).
TINY_8H = dict(TINY, num_attention_heads=8, num_key_value_heads=4)
# Qwen3: per-head q/k norms, replicated over TP, whose grads finalize_model_grads sums.
QWEN3 = dict(TINY, model_type="qwen3", head_dim=48)
# Qwen3-MoE: layer 1 dense, layers 0, 2, 3 with 4 routed experts (top-2, renormalised); a
# load-balancing loss large enough that its router gradient counts.
QWEN3_MOE = dict(QWEN3, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=64, mlp_only_layers=[1], norm_topk_prob=True,
                 router_aux_loss_coef=0.01)
MODELS = {"qwen2": TINY, "llama_tied": TIED_LLAMA, "qwen2_8h": TINY_8H, "qwen3": QWEN3,
          "qwen3_moe": QWEN3_MOE}


# One world per world size, not per case: the references run in one world of 1, the cases
# of each world size in one world, megatron's parallel state rebuilt between cases
# (harness.run_each). The group keeps this module's tests on one xdist worker, so each
# world is started once.
pytestmark = pytest.mark.xdist_group("megatron_parallel")
TIMEOUT_S = 1800
RUN_CASE = "tests.distributed.megatron_cases:run_case"


@functools.cache
def references() -> dict:
    calls = [(RUN_CASE, (hf, {}, None)) for hf in MODELS.values()]
    return dict(zip(MODELS, run_distributed(run_each, 1, calls, timeout=TIMEOUT_S)[0],
                    strict=True))


def reference(model: str) -> dict:
    return references()[model]


def check(results: list[dict], world: int, par: dict) -> None:
    errors = {}
    for r in results:
        errors.update({k: max(v, errors.get(k, 0.0)) for k, v in r["errors"].items()})
    grads = [k for k in errors if k.startswith("grad:")]
    logits = {k for k in errors if k.startswith("logits:")}
    assert len(grads) >= 10, f"too few parameters compared: {grads}"
    assert logits == {f"logits:{i}" for i in range(MICRO_BATCHES)}, logits
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] < TOL, f"{par}: worst relative errors {worst}"


CASES = [  # (id, world, par, model)
    ("tp2", 2, {"tp": 2}, "qwen2"),
    ("tp4", 4, {"tp": 4}, "qwen2_8h"),
    ("tp2-sp", 2, {"tp": 2, "sp": True}, "qwen2"),
    ("tp2-sp-qwen3", 2, {"tp": 2, "sp": True}, "qwen3"),
    ("pp2", 2, {"pp": 2}, "qwen2"),
    ("pp2-tied", 2, {"pp": 2}, "llama_tied"),
    ("pp2-vpp2", 2, {"pp": 2, "vpp": 2}, "qwen2"),
    ("tp2-pp2", 4, {"tp": 2, "pp": 2}, "qwen2"),
    ("tp2-pp2-sp-tied", 4, {"tp": 2, "pp": 2, "sp": True}, "llama_tied"),
    ("dp2", 2, {}, "qwen2"),
    ("dp2-tp2", 4, {"tp": 2}, "qwen2"),
    # MoE: experts over ep ranks (megatron's all-to-all dispatcher over gloo), each expert
    # whole (etp=1) or split over the TP group (etp=tp: the dispatcher's uneven gathers).
    ("ep2", 2, {"ep": 2}, "qwen3_moe"),
    ("tp2-sp-ep2-etp1", 2, {"tp": 2, "sp": True, "ep": 2, "etp": 1}, "qwen3_moe"),
    ("tp2-sp-ep2-etp2", 4, {"tp": 2, "sp": True, "ep": 2}, "qwen3_moe"),
    ("pp2-ep2", 4, {"pp": 2, "ep": 2}, "qwen3_moe"),
]
# Without the p2p adaptation (megatron's batched p2p over gloo), in the world of 2.
UNADAPTED_VPP = ("pp2-vpp2-batched-p2p", 2, {"pp": 2, "vpp": 2}, "qwen2")


# Routing replay at EP=2, in the world of 2 (tests/distributed/routing_replay_cases.py).
REPLAY = ("routing-replay", 2, "tests.distributed.routing_replay_cases:replay_case",
          (QWEN3_MOE, 2))


@functools.cache
def world_results(world: int) -> dict[str, list[dict]]:
    """``{case id: per-rank results}`` of every case of this world size, in one spawn."""
    cases = [c for c in [*CASES, UNADAPTED_VPP] if c[1] == world]
    calls = [(RUN_CASE, (MODELS[model], par, reference(model), True, cid != UNADAPTED_VPP[0]))
             for cid, _, par, model in cases]
    extra = [REPLAY] if REPLAY[1] == world else []
    calls += [(fn, args) for _, _, fn, args in extra]
    ranks = run_distributed(run_each, world, calls, timeout=TIMEOUT_S)
    ids = [c[0] for c in cases] + [e[0] for e in extra]
    return {cid: [r[i] for r in ranks] for i, cid in enumerate(ids)}


@pytest.mark.parametrize("case_id,world,par,model", [pytest.param(*c, id=c[0]) for c in CASES])
def test_parallel_matches_single_process(case_id, world, par, model):
    check(world_results(world)[case_id], world, par)


def test_cpu_layer_is_needed_for_tp():
    with pytest.raises(RankFailed, match="CUDA|cuda"):
        run_distributed(run_case, 2, TINY, {"tp": 2}, reference("qwen2"), apply_platform=False)


def test_batched_p2p_over_gloo_is_silently_wrong_with_virtual_pipeline():
    """Without the p2p adaptation the interleaved schedule runs but computes wrong grads:
    the reason the adaptation exists and the case a test must cover."""
    results = world_results(2)[UNADAPTED_VPP[0]]
    worst = max(v for r in results for v in r["errors"].values())
    assert worst > 1e-3, f"expected a silent mismatch, got worst relative error {worst}"


def test_routing_replay_on_policy_ratio_is_exactly_one():
    """Two experts of every router tie. The training forward of a scored micro-batch, with
    replay and unchanged weights, gives the scoring forward's log-probs exactly (ratio 1),
    and the router still gets a gradient (gate weights come from the current logits)."""
    for r in world_results(2)[REPLAY[0]]:
        assert r["routers"] == 3 and r["misses"] == 0, r
        assert r["on_policy"] == 0.0, r
        assert r["router_grad"] > 0, r


def test_routing_replay_keeps_the_experts_when_near_ties_flip():
    """A 1e-5 perturbation of one tied router row flips some tokens' experts: without
    replay their log-probs move by > 1e-2, with replay by about the perturbation."""
    results = world_results(2)[REPLAY[0]]
    worst = {k: max(r[k] for r in results) for k in ("replayed", "free")}
    print(f"max |logp - old logp| after a 1e-5 router perturbation: with replay "
          f"{worst['replayed']:.2e}, without {worst['free']:.2e}")
    assert worst["free"] > 1e-2, "the perturbation flipped no expert: the test proves nothing"
    assert worst["replayed"] < 1e-4
