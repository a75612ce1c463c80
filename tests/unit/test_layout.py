"""The rank -> rollout-engine mapping, the prompt shards, the global batch's split over
data-parallel ranks, micro-batch placement and metric reductions: pure functions, checked
against brute-force expectations."""

from __future__ import annotations

import pytest
import torch

from megatron_erc.trainer.batch import Sequence, plan_minibatches
from megatron_erc.trainer.layout import engine_slot, shard
from megatron_erc.trainer.metrics import Reduce, combine, reduction


def test_engine_slots_tile_the_world_node_by_node():
    # 16 ranks on 2 nodes of 8, rollout.tp = 4
    slots = [engine_slot(r, r % 8, 16, 8, 4) for r in range(16)]
    assert [s.engine_id for s in slots] == [r // 4 for r in range(16)]
    assert all(s.num_engines == 4 for s in slots)
    assert [r for r in range(16) if slots[r].is_leader] == [0, 4, 8, 12]
    s9 = slots[9]
    assert (s9.engine_rank, s9.ranks, s9.devices) == (1, (8, 9, 10, 11), (0, 1, 2, 3))
    assert slots[4].devices == (4, 5, 6, 7) and slots[12].devices == (4, 5, 6, 7)
    # each rank is in exactly the engine that lists it
    for r, s in enumerate(slots):
        assert s.ranks[s.engine_rank] == r
    # rollout.tp = 1: every rank is its own engine on its own device
    one = [engine_slot(r, r % 8, 16, 8, 1) for r in range(16)]
    assert all(s.is_leader and s.ranks == (r,) and s.devices == (r % 8,)
               for r, s in enumerate(one))


@pytest.mark.parametrize("world,per_node,tp,match", [
    (6, 6, 4, "divide the number of ranks"), (16, 6, 4, "per node"), (4, 4, 0, ">= 1")])
def test_impossible_engine_layouts_say_what_to_change(world, per_node, tp, match):
    with pytest.raises(ValueError, match=match):
        engine_slot(0, 0, world, per_node, tp)


@pytest.mark.parametrize("items,shards", [(0, 3), (5, 5), (7, 3), (128, 16), (3, 8)])
def test_shards_cover_every_item_once_and_balance(items, shards):
    parts = [shard(items, shards, i) for i in range(shards)]
    covered = [x for p in parts for x in range(items)[p]]
    assert covered == list(range(items))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_minibatch_plan_is_layout_independent_and_balanced():
    tokens = [50, 10, 40, 30, 20, 60, 5, 45, 35, 25]
    for dp in (1, 2, 3, 4):
        plan = plan_minibatches(tokens, updates=2, dp_size=dp)
        assert len(plan) == 2 and all(len(mini) == dp for mini in plan)
        # mini-batch m holds the same groups at any DP size: the first and second halves
        assert sorted(g for r in plan[0] for g in r) == [0, 1, 2, 3, 4]
        assert sorted(g for r in plan[1] for g in r) == [5, 6, 7, 8, 9]
        for mini in plan:
            counts = [len(r) for r in mini]
            assert max(counts) - min(counts) <= 1
    # tokens balanced: the brute-force best split of [50,10,40,30,20] over 2 ranks with
    # counts (3, 2) has max load 80; the greedy plan gets there too
    plan = plan_minibatches(tokens, updates=2, dp_size=2)
    loads = [sum(tokens[g] for g in r) for r in plan[0]]
    assert max(loads) == 80
    # fewer groups than updates: one group per mini-batch; more ranks than groups: empties
    assert plan_minibatches([7, 8], updates=4, dp_size=3) == [[[0], [], []], [[1], [], []]]


def test_micro_batches_are_built_on_the_given_device_with_equal_counts_on_every_rank():
    from megatron_erc.trainer.steps import micro_batches_for_rank

    def group(k, n, length):
        return [Sequence([1, 2, 3], [4] * (length + j), [-0.5] * (length + j), 0.1 * j, float(j))
                for j in range(n)]

    groups = [group(k, 4, 3 + 2 * k) for k in range(5)]
    per_rank = [micro_batches_for_rank(groups, updates=2, dp_size=2, dp_rank=r,
                                       micro_batch_size=3, seq_len=64, pad_id=0,
                                       device=torch.device("meta"), fixed_shape=True)
                for r in range(2)]
    # every rank: the same mini-batch count and micro-batch count per mini-batch
    assert [len(m) for m in per_rank[0]] == [len(m) for m in per_rank[1]]
    for minis in per_rank:
        shapes = {tuple(mb.tokens.shape) for mini in minis for mb in mini}
        assert len(shapes) == 1 and next(iter(shapes))[0] == 3  # one [b, S] shape per rank
        for mini in minis:
            for mb in mini:
                for name in ("tokens", "labels", "loss_mask", "advantages", "rewards",
                             "rollout_logp"):
                    assert getattr(mb, name).device.type == "meta", name
    cpu, cpu1 = (micro_batches_for_rank(groups, updates=2, dp_size=2, dp_rank=r,
                                        micro_batch_size=3, seq_len=64, pad_id=0, device="cpu")
                for r in range(2))
    assert [len(m) for m in cpu] == [len(m) for m in cpu1]  # equal counts without PP too
    assert any(mb.tokens.shape[0] < 3 for m in cpu + cpu1 for mb in m)  # no filler rows
    # every response token of every group is trained exactly once across the two ranks
    masked = sum(float(mb.loss_mask.sum()) for minis in (cpu, cpu1) for m in minis for mb in m)
    assert masked == sum(len(s.response_ids) for g in groups for s in g)


def test_every_metric_declares_its_reduction():
    assert reduction("loss") is Reduce.TOKEN_SUM
    assert reduction("erc/ratio_p50") is Reduce.QUANTILE
    assert reduction("grad_norm") is Reduce.SAME
    assert reduction("time/step") is Reduce.MAX
    with pytest.raises(KeyError, match="declares no reduction"):
        reduction("made/up")
    assert combine("loss", [0.25, 0.5]) == 0.75
    assert combine("time/step", [1.0, 3.0]) == 3.0
    assert combine("erc/ratio_p50", [float("nan"), 1.0, 3.0]) == 2.0
    assert combine("accuracy", [0.5, 0.5]) == 0.5
