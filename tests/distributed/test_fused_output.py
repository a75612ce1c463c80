"""The actor with the fused output layer (``parallel.fused_output_layer``: log-probs and
entropy from the final hidden states and the output weight through the Triton kernels, run
here by Triton's interpreter) trains the same step as the actor with ordinary logits: per-token
log-probs, entropies and every parameter gradient, at TP=1 and at TP=2 with sequence
parallelism (where the hidden states are gathered and their gradient reduced once)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.test_megatron_parallel import TINY

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed")
TOL = 1e-5


def fused_vs_logits(rank: int, world: int, hf_dict: dict, layouts: list[dict]) -> list[dict]:
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig
    from megatron_erc.trainer.steps import micro_batches_for_rank
    from tests.distributed.packing_cases import _rel, _sequences, _train

    platform.setup()
    d = dict(hf_dict)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    seqs = _sequences(hf.vocab_size)[:4]
    out = []
    for lay in layouts:
        runs = {}
        for fused in (False, True):
            platform.init_model_parallel(lay.get("tp", 1), 1, seed=3)
            actor = Actor(hf, ParallelConfig(tp=lay.get("tp", 1), pad_vocab_multiple=1,
                                             sequence_parallel=lay.get("sp", False),
                                             fused_output_layer=fused), OptimConfig())
            assert (actor.fused is not None) == fused
            mbs = micro_batches_for_rank([seqs], updates=1, dp_size=1, dp_rank=0,
                                         micro_batch_size=2, seq_len=64, pad_id=0,
                                         device="cpu")[0]
            runs[fused] = _train(actor, mbs)
            del actor
            ps.destroy_model_parallel()
        (ref, ref_grads), (got, grads) = runs[False], runs[True]
        errors = {f"grad:{k}": _rel(grads[k], v) for k, v in ref_grads.items()}
        for sid, (_, logp, ent) in ref.items():
            errors[f"logp:{sid}"] = _rel(got[sid][1], logp)
            errors[f"entropy:{sid}"] = _rel(got[sid][2], ent)
        out.append({"layout": lay, "errors": errors, "n_seqs": len(ref)})
    return out


def test_fused_output_layer_trains_like_the_logits_path():
    layouts = [{}, {"tp": 2, "sp": True}]
    ranks = run_distributed(fused_vs_logits, 2, TINY, layouts, timeout=900)
    for per_rank in ranks:
        for r in per_rank:
            assert r["n_seqs"] == 4
            assert sum(k.startswith("grad:") for k in r["errors"]) >= 10
            worst = sorted(r["errors"].items(), key=lambda kv: -kv[1])[:3]
            assert worst[0][1] < TOL, (r["layout"], worst)
