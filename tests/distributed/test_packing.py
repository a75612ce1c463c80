"""Packed (THD) micro-batches equal one sequence at a time: logits, log-probs, entropies and
every parameter gradient, at TP=1 (two data-parallel replicas), TP=2 with sequence
parallelism, and PP=2 (packed rows of one length per pipeline), in one spawned world."""

from __future__ import annotations

from tests.distributed.harness import run_distributed
from tests.distributed.packing_cases import SEQS, compare_packed
from tests.distributed.test_megatron_parallel import TINY

TOL = 1e-5
LAYOUTS = [{}, {"tp": 2, "sp": True}, {"pp": 2}]


def test_packed_equals_one_sequence_at_a_time():
    ranks = run_distributed(compare_packed, 2, TINY, LAYOUTS, timeout=600)
    for i, lay in enumerate(LAYOUTS):
        per_rank = [r[i] for r in ranks]
        assert any(r["last_stage"] for r in per_rank)
        for r in per_rank:
            assert r["n_grads"] >= 5
            if r["last_stage"]:
                assert {k.split(":")[1] for k in r["errors"] if k.startswith("logp")} == {
                    str(i) for i in range(len(SEQS))}
            worst = sorted(r["errors"].items(), key=lambda kv: -kv[1])[:3]
            assert worst[0][1] < TOL, (lay, worst)
