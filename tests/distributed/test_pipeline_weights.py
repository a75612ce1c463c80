"""Every rank (each hosts or drives a rollout engine) receives the whole model: at PP=2 and
TP2 x PP2, ``Actor.full_hf_weights`` yields on every rank exactly the HF tensors that an independent
all-gather of every stage's weights gives, each once."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from tests.distributed.harness import run_distributed, run_each

# The two-rank cases share one world (harness.run_each), started once on one xdist worker.
pytestmark = pytest.mark.xdist_group("pipeline_weights")

TINY = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())


def stream(rank: int, world: int, tp: int, pp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig

    platform.setup()
    platform.init_model_parallel(tp, pp, seed=3)
    d = {k: v for k, v in TINY.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(3)
    actor = Actor(AutoConfig.for_model(d.pop("model_type"), **d), ParallelConfig(tp=tp, pp=pp),
                  OptimConfig(lr=1e-3))
    got = [(n, t.clone()) for n, t in actor.full_hf_weights()]
    # the reference: every stage's (TP-gathered) tensors, all-gathered as objects
    mine = {n: t.clone() for n, t in actor.hf_weights()}
    stages = [None] * pp
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return {"got": got, "want": {n: t for s in stages for n, t in s.items()}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """``stream`` at PP=2 and ``export_at_pp2`` in one world of 2."""
    out = str(tmp_path_factory.mktemp("pp2_export"))
    calls = [("tests.distributed.test_pipeline_weights:stream", (1, 2)),
             ("tests.distributed.test_pipeline_weights:export_at_pp2", (out,))]
    ranks = run_distributed(run_each, 2, calls, timeout=900)
    return {"stream": [r[0] for r in ranks], "export": [r[1] for r in ranks]}


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_every_rank_receives_every_stage_exactly(tp, pp, request):
    results = (request.getfixturevalue("two_ranks")["stream"] if tp * pp == 2
               else run_distributed(stream, tp * pp, tp, pp))
    for r in results:
        names = [n for n, _ in r["got"]]
        assert len(names) == len(set(names)), "a tensor arrived twice"
        assert set(names) == set(r["want"]), set(names) ^ set(r["want"])
        assert any(".layers.3." in n for n in names) and "lm_head.weight" in names  # last stage
        assert any(".layers.0." in n for n in names)  # first stage
        for name, tensor in r["got"]:
            assert torch.equal(tensor, r["want"][name]), name


def export_at_pp2(rank: int, world: int, out: str):
    """Export a PP=2 actor as an HF directory and compare transformers' logits with the
    megatron model's (last stage)."""
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig
    from megatron_erc.trainer.batch import MicroBatch
    from megatron_erc.trainer.config import ModelConfig
    from megatron_erc.trainer.sft import export_hf

    platform.setup()
    platform.init_model_parallel(1, 2, seed=5)
    d = {k: v for k, v in TINY.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(5)
    actor = Actor(AutoConfig.for_model(d.pop("model_type"), **d), ParallelConfig(pp=2),
                  OptimConfig(lr=1e-3))
    model_dir = pathlib.Path(out) / "src"
    model_dir.mkdir(parents=True, exist_ok=True)
    export_hf(actor, pathlib.Path(out) / "hf", ModelConfig(path=str(model_dir)))
    tokens = torch.randint(0, actor.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mb = MicroBatch(tokens=tokens, labels=tokens, loss_mask=torch.ones(2, 16))
    captured = {}

    def keep(logits, batch):
        captured["logits"] = logits.detach().clone()
        return logits.new_zeros(()), {}

    actor.forward_backward([mb], keep, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    hf = AutoModelForCausalLM.from_pretrained(pathlib.Path(out) / "hf", dtype=torch.float32)
    want = hf(input_ids=tokens).logits
    got = captured["logits"][..., : want.shape[-1]]
    return float((got - want).abs().max() / want.abs().max())


def test_sft_export_at_pp2_gives_the_megatron_logits(two_ranks):
    results = two_ranks["export"]
    assert results[0] is None and results[1] is not None
    assert results[1] < 1e-5, results[1]
