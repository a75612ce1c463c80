"""Token-budget micro-batches and packed (THD) rows, on the host: what goes where.

The numerics of packed rows through the model (logits, log-probs, entropy, gradients equal to
one sequence at a time) are in ``tests/distributed/test_packing.py``.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_erc.trainer.batch import Sequence, micro_bins, pack, pack_thd
from megatron_erc.trainer.steps import micro_batches_for_rank


def _seq(prompt: int, response: int, adv: float = 0.5, reward: float = 1.0) -> Sequence:
    return Sequence(list(range(1, prompt + 1)), list(range(100, 100 + response)),
                    [-0.1 * (i + 1) for i in range(response)], adv, reward)


@pytest.mark.parametrize("seed", range(5))
def test_budget_bins_cover_every_sequence_once_within_budget(seed):
    rng = random.Random(seed)
    lengths = [[int(rng.lognormvariate(3.5, 0.9)) + 1 for _ in range(rng.randint(0, 40))]
               for _ in range(3)]
    budget = 120
    bins = micro_bins(lengths, rows=4, max_tokens=budget)
    assert len({len(b) for b in bins}) == 1, "every rank runs the same micro-batch count"
    for lens, rank_bins in zip(lengths, bins, strict=True):
        assert sorted(i for b in rank_bins for i in b) == list(range(len(lens)))
        for b in rank_bins:
            assert len(b) == 1 or sum(lens[i] for i in b) <= budget
    # a sequence over the budget sits alone
    big = micro_bins([[500, 10, 20], [5]], rows=4, max_tokens=100)
    assert [0] in big[0] and all(len(b) <= 2 for b in big[0])


def test_budget_balances_tokens():
    lens = [[90, 80, 70, 60, 50, 40, 30, 20, 10, 10]]
    bins = micro_bins(lens, rows=4, max_tokens=160)[0]
    loads = sorted(sum(lens[0][i] for i in b) for b in bins)
    assert len(bins) == 3 and loads[-1] - loads[0] <= 20, loads


def test_fixed_count_without_budget_matches_rows():
    bins = micro_bins([[3] * 7, [3] * 2], rows=3, max_tokens=None)
    assert bins[0] == [[0, 1, 2], [3, 4, 5], [6]] and bins[1] == [[0, 1], [], []]


def test_packed_row_holds_the_padded_rows_tokens():
    seqs = [_seq(3, 4, 0.5, 1.0), _seq(2, 1, -1.0, 0.0), _seq(5, 6, 2.0, 1.0)]
    padded = pack(seqs, rows=3, width=16, pad_id=0, device="cpu")
    thd = pack_thd(seqs, length=24, pad_id=0, device="cpu")
    assert thd.tokens.shape == (1, 24) and thd.cu_seqlens.tolist() == [0, 6, 8, 18, 24]
    assert thd.max_seqlen == 10
    for i, (a, b) in enumerate(zip(thd.cu_seqlens[:-2], thd.cu_seqlens[1:-1], strict=True)):
        n = int(b - a)
        for name in ("tokens", "labels", "loss_mask", "rollout_logp"):
            assert torch.equal(getattr(thd, name)[0, a:b], getattr(padded, name)[i, :n]), name
        assert torch.equal(thd.advantages[0, a:b], padded.advantages[i].expand(n))
        assert torch.equal(thd.rewards[0, a:b], padded.rewards[i].expand(n))
    assert thd.loss_mask[0, 18:].sum() == 0 and thd.loss_mask.sum() == 4 + 1 + 6
    with pytest.raises(ValueError, match="one row"):
        thd.rows(slice(0, 1))


def test_nothing_is_cut():
    with pytest.raises(ValueError, match="run.seq_len"):
        pack([_seq(10, 30)], rows=1, width=32, pad_id=0, device="cpu")
    with pytest.raises(ValueError, match="run.seq_len"):
        micro_batches_for_rank([[_seq(10, 30)]], updates=1, dp_size=1, dp_rank=0,
                               micro_batch_size=2, seq_len=32, pad_id=0, device="cpu",
                               packed=True)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fixed_shape", [False, True])
def test_budget_micro_batches_train_every_token_once(packed, fixed_shape):
    rng = random.Random(0)
    groups = [[_seq(rng.randint(2, 9), rng.randint(1, 60)) for _ in range(4)] for _ in range(6)]
    per_rank = [micro_batches_for_rank(groups, updates=2, dp_size=2, dp_rank=r,
                                       micro_batch_size=4, seq_len=80, pad_id=0, device="cpu",
                                       fixed_shape=fixed_shape, max_tokens=100, packed=packed)
                for r in range(2)]
    assert [len(m) for m in per_rank[0]] == [len(m) for m in per_rank[1]]
    masked = sum(float(mb.loss_mask.sum()) for minis in per_rank for m in minis for mb in m)
    assert masked == sum(len(s.response_ids) for g in groups for s in g)
    for minis in per_rank:
        mbs = [mb for m in minis for mb in m]
        if fixed_shape:
            assert len({tuple(mb.tokens.shape) for mb in mbs}) == 1
        for mb in mbs:
            assert mb.tokens.shape[-1] % 8 == 0
            real = int(mb.cu_seqlens[-1]) if packed else None
            if packed:
                assert mb.tokens.shape[0] == 1 and real == mb.tokens.shape[1]
