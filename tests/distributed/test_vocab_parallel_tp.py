"""``logprobs_and_entropy`` over a vocabulary sharded on TP = 1, 2, 4 gloo ranks equals the
single-process float64 full-vocabulary reference, gradients included.

One spawn of 4 ranks covers every TP size: the ranks form TP=4, TP=2 ({0,1}, {2,3}) and
TP=1 subgroups and loop over all cases inside the rank function (spawns are slow).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed.harness import run_distributed

WORLD = 4
# (true vocab size, padded vocab size): padding happens when TP does not divide the vocab;
# ``(5, 16)`` leaves whole TP=4 ranks with nothing but padding (Megatron-style big padding).
VOCABS = [(24, 24), (22, 24), (5, 16)]
# (temperature, chunk_size): paired rather than crossed to keep the spawn short.
TEMPERATURE_CHUNKS = [(1.0, None), (0.6, 3), (1.7, 4)]
# dtype, value tol, grad (rtol, atol): bf16 gradients are rounded to bf16 (2**-8 relative).
DTYPES = [(torch.float32, 1e-5, (1e-4, 1e-5)), (torch.bfloat16, 1e-5, (1e-2, 2e-3))]
PAD_FILL = 1e4  # padded logits are huge: any leak into softmax would dominate


def _reference(logits, labels, temperature, vocab_size, w_logp, w_ent):
    x = logits[..., :vocab_size].double().requires_grad_(True)
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    ((w_logp * logp).sum() + (w_ent * ent).sum()).backward()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[..., :vocab_size] = x.grad
    return logp.detach(), ent.detach(), grad


def _forbid_global_parallel_state():
    from megatron.core import parallel_state

    def boom(*_a, **_k):
        raise AssertionError("megatron global parallel state was read")

    for name in dir(parallel_state):
        if name.startswith(("get_", "is_", "model_parallel_is_initialized")):
            setattr(parallel_state, name, boom)


def _count_all_reduces():
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    return calls


def _check_all_cases(rank, world_size):
    from megatron_erc.ops import logprobs_and_entropy

    _forbid_global_parallel_state()
    groups = {}
    for tp in (1, 2, 4):
        for first in range(0, world_size, tp):
            ranks = list(range(first, first + tp))
            group = dist.new_group(ranks)  # every rank must create every group
            if rank in ranks:
                groups[tp] = (group, ranks.index(rank))
    calls = _count_all_reduces()

    checked = 0
    for case, (tp, (vocab_size, padded), (temperature, chunk), (dtype, vtol, gtol)) in enumerate(
            (tp, v, tc, d) for tp in (1, 2, 4) for v in VOCABS for tc in TEMPERATURE_CHUNKS
            for d in DTYPES):
        group, tp_rank = groups[tp]
        gen = torch.Generator().manual_seed(case)  # same data on every rank
        full = (torch.randn(2, 5, padded, generator=gen) * 3).to(dtype)
        full[..., vocab_size:] = PAD_FILL
        labels = torch.randint(0, vocab_size, (2, 5), generator=gen)
        w_logp = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        w_ent = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        ref_logp, ref_ent, ref_grad = _reference(full, labels, temperature, vocab_size,
                                                 w_logp, w_ent)
        v_local = padded // tp
        cols = slice(tp_rank * v_local, (tp_rank + 1) * v_local)
        where = f"case {case}: tp={tp} vocab={vocab_size}/{padded} T={temperature} " \
                f"{dtype} chunk={chunk} tp_rank={tp_rank}"

        for entropy_grad in (False, True):
            shard = full[..., cols].clone().requires_grad_(True)
            before = shard.detach().clone()
            n_calls = len(calls)
            logp, ent = logprobs_and_entropy(
                shard, labels, tp_group=group, vocab_size=vocab_size,
                temperature=temperature, chunk_size=chunk, entropy_grad=entropy_grad)
            assert len(calls) - n_calls == (2 if tp > 1 else 0), where
            torch.testing.assert_close(logp.double(), ref_logp, rtol=vtol, atol=vtol,
                                       msg=lambda m, w=where: f"logp {w}: {m}")
            torch.testing.assert_close(ent.double(), ref_ent, rtol=vtol, atol=vtol,
                                       msg=lambda m, w=where: f"entropy {w}: {m}")
            loss = (w_logp * logp).sum()
            if entropy_grad:
                loss = loss + (w_ent * ent).sum()
            else:
                assert ent.grad_fn is None, where
            loss.backward()
            assert torch.equal(shard.detach(), before), f"logits modified in place: {where}"
            if entropy_grad:
                expected = ref_grad[..., cols]
            else:
                _, _, expected = _reference(full, labels, temperature, vocab_size, w_logp,
                                            torch.zeros_like(w_ent))
                expected = expected[..., cols]
            assert shard.grad.dtype == dtype, where
            torch.testing.assert_close(shard.grad.double(), expected, rtol=gtol[0],
                                       atol=gtol[1],
                                       msg=lambda m, w=where: f"grad {w}: {m}")
            pad_cols = max(0, min(v_local, (tp_rank + 1) * v_local - vocab_size))
            if pad_cols:
                assert torch.equal(shard.grad[..., v_local - pad_cols:],
                                   torch.zeros_like(shard.grad[..., v_local - pad_cols:])), where
            checked += 1
    _check_vocab_start_override(rank, world_size)
    return checked


def test_matches_single_process_reference_tp_1_2_4():
    checked = run_distributed(_check_all_cases, WORLD)
    n = 3 * len(VOCABS) * len(TEMPERATURE_CHUNKS) * len(DTYPES) * 2
    assert checked == [n] * WORLD


def _check_vocab_start_override(rank, world_size):
    """An explicit ``vocab_start`` (shards in reverse rank order) is honoured."""
    from megatron_erc.ops import logprobs_and_entropy

    gen = torch.Generator().manual_seed(7)
    full = torch.randn(6, 5 * world_size, generator=gen)
    labels = torch.randint(0, 5 * world_size, (6,), generator=gen)
    owner = world_size - 1 - rank
    shard = full[:, owner * 5:(owner + 1) * 5]
    logp, ent = logprobs_and_entropy(shard, labels, tp_group=dist.group.WORLD,
                                     vocab_start=owner * 5, chunk_size=4)
    ref = torch.log_softmax(full.double(), -1)
    torch.testing.assert_close(logp.double(), ref.gather(-1, labels[:, None])[:, 0])
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1))
