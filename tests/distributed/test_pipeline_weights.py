"""Every rank (each hosts or drives a rollout engine) receives the whole model: at PP=2 and
TP2 x PP2, ``engine_weights`` yields on every rank exactly the HF tensors that an independent
all-gather of every stage's weights gives, each once."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from tests.distributed.harness import run_distributed

TINY = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())


def stream(rank: int, world: int, tp: int, pp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig
    from megatron_erc.trainer.steps import engine_weights

    platform.setup()
    platform.init_model_parallel(tp, pp, seed=3)
    d = {k: v for k, v in TINY.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(3)
    actor = Actor(AutoConfig.for_model(d.pop("model_type"), **d), ParallelConfig(tp=tp, pp=pp),
                  OptimConfig(lr=1e-3))
    got = [(n, t.clone()) for n, t in engine_weights(actor)]
    # the reference: every stage's (TP-gathered) tensors, all-gathered as objects
    mine = {n: t.clone() for n, t in actor.hf_weights()}
    stages = [None] * pp
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return {"got": got, "want": {n: t for s in stages for n, t in s.items()}}


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_every_rank_receives_every_stage_exactly(tp, pp):
    results = run_distributed(stream, tp * pp, tp, pp)
    for r in results:
        names = [n for n, _ in r["got"]]
        assert len(names) == len(set(names)), "a tensor arrived twice"
        assert set(names) == set(r["want"]), set(names) ^ set(r["want"])
        assert any(".layers.3." in n for n in names) and "lm_head.weight" in names  # last stage
        assert any(".layers.0." in n for n in names)  # first stage
        for name, tensor in r["got"]:
            assert torch.equal(tensor, r["want"][name]), name
