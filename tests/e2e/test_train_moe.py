"""End-to-end ``megatron-erc train`` of a tiny Qwen3-MoE (examples/tiny_moe/config.json with
the demo tokenizer's vocabulary): megatron MoE layers in the actor, the embedded engine
loading per-expert weights at each sync, a checkpoint at exit. One rank: the trainer does
not yet pass ``parallel.ep`` to megatron's parallel state, so ``ep`` > 1 stops at model build
(``build_model_chunks`` refuses the mismatch)."""

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


def test_train_tiny_moe(task, tmp_path):  # noqa: F811 (the fixture)
    init = moe_init(task, tmp_path / "moe_init")
    run = tmp_path / "run"
    train(overrides(task, run, 2, f"model.path={init}"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "grad_norm", "reward/mean", "kl/approx"):
            assert math.isfinite(r[k]), (k, r)
    assert (run / "checkpoints" / "step_00000002").is_dir()
