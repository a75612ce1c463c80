"""End-to-end ``megatron-erc train`` of a tiny Qwen3-MoE (examples/tiny_moe/config.json with
the demo tokenizer's vocabulary): megatron MoE layers in the actor, the embedded engine
loading per-expert weights at each sync, routing replay, the moe/* metrics, a checkpoint at
exit; one rank, and two ranks with expert parallelism (EP=2 over torchrun + gloo), which must
train the same first step."""

from __future__ import annotations

import json
import math

import torch

from tests.e2e.test_train import REPO, metrics, overrides, task, train  # noqa: F401 (fixture)


def moe_init(task_dir, out):
    """A random-init Qwen3-MoE saved like the demo's init model (same vocabulary and ids)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads((REPO / "examples" / "tiny_moe" / "config.json").read_text())
    base = json.loads((task_dir / "init" / "config.json").read_text())
    d.pop("architectures"), d.pop("torch_dtype")
    d.update({k: base.get(k) for k in ("vocab_size", "eos_token_id", "pad_token_id",
                                        "bos_token_id")})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d)) \
        .save_pretrained(out)
    return out


MOE_KEYS = ("moe/aux_loss", "moe/expert_load_max", "moe/expert_load_min",
            "moe/replay_misses")


def test_train_tiny_moe_ep2_matches_one_rank(task, tmp_path):  # noqa: F811 (the fixture)
    init = moe_init(task, tmp_path / "moe_init")
    extra = (f"model.path={init}", "algo.routing_replay=old")
    one, ep2 = tmp_path / "one", tmp_path / "ep2"
    train(overrides(task, one, 2, *extra))
    # megatron's load-balancing loss is a statistic of each rank's micro-batch, so its
    # gradient depends on the split: compared without it (its value is compared below)
    flat = (*extra, "parallel.moe_aux_loss_coeff=0")
    one_flat = tmp_path / "one_flat"
    train(overrides(task, one_flat, 1, *flat))
    train(overrides(task, ep2, 1, *flat, "parallel.ep=2"), nproc=2)
    rows = metrics(one)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "grad_norm", "reward/mean", "kl/approx", *MOE_KEYS):
            assert math.isfinite(r[k]), (k, r)
        assert r["moe/replay_misses"] == 0  # every off-policy update found its experts
        assert r["moe/expert_load_max"] >= 1.0 >= r["moe/expert_load_min"]
    assert (one / "checkpoints" / "step_00000002").is_dir()
    # the same global batch at EP=2 (x DP=2): the same first step
    (got,), (want,) = metrics(ep2), metrics(one_flat)
    for k in ("reward/mean", "loss", "grad_norm", "moe/expert_load_max", "moe/expert_load_min"):
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-9), (k, got[k], want[k])
