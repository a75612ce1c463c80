"""The fused output layer (``ops.fused_linear``) with the vocabulary sharded over TP=2 gloo
ranks, run by Triton's interpreter, equals the single-process float64 reference from the
full weight: log-probs, entropy, hidden-state gradient (summed over the group) and each
rank's weight-shard gradient; padding (one case leaves rank 1 nothing but padding),
temperature, bf16. One spawn runs every case; nothing reads Megatron's parallel state.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed")

WORLD = 2
TOKENS, HIDDEN = 21, 19
VOCABS = [(43, 46), (13, 32)]  # (true, padded): (13, 32) leaves rank 1 only padding
TEMPERATURE_GRADS = [(1.0, False), (0.7, True)]
# dtype: (value tol, grad rtol, grad atol relative to the largest reference gradient)
DTYPES = [(torch.float32, (1e-5, 1e-4, 1e-5)), (torch.bfloat16, (1e-5, 3e-2, 2e-2))]


def _reference(hidden, weight, labels, vocab_size, temperature, w_logp, w_ent):
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    logp_all = torch.log_softmax(h @ w[:vocab_size].T / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    ((w_logp * logp).sum() + (w_ent * ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _close(got, want, rtol, atol, what):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _check_fused_cases(rank, world_size):
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import)
    from megatron_erc.ops.fused_linear import fused_logprobs_and_entropy
    from tests.distributed.test_vocab_parallel_tp import (
        _count_all_reduces,
        _forbid_global_parallel_state,
    )

    _forbid_global_parallel_state()
    calls = _count_all_reduces()
    group = dist.group.WORLD
    checked = 0
    for case, ((vocab_size, padded), (temperature, entropy_grad), (dtype, tols)) in enumerate(
            (v, tg, d) for v in VOCABS for tg in TEMPERATURE_GRADS for d in DTYPES):
        vtol, rtol, atol = tols
        gen = torch.Generator().manual_seed(case)  # same data on every rank
        hidden = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype)
        weight = (torch.randn(padded, HIDDEN, generator=gen) * 0.6).to(dtype)
        labels = torch.randint(0, vocab_size, (TOKENS,), generator=gen)
        w_logp = torch.randn(TOKENS, generator=gen, dtype=torch.float64)
        w_ent = torch.randn(TOKENS, generator=gen, dtype=torch.float64)
        ref_logp, ref_ent, ref_gh, ref_gw = _reference(
            hidden, weight, labels, vocab_size, temperature, w_logp,
            w_ent if entropy_grad else torch.zeros_like(w_ent))
        v_local = padded // world_size
        rows = slice(rank * v_local, (rank + 1) * v_local)
        where = f"case {case}: vocab={vocab_size}/{padded} T={temperature} {dtype} rank={rank}"

        h = hidden.clone().requires_grad_(True)
        w = weight[rows].clone().requires_grad_(True)
        n_calls = len(calls)
        logp, ent = fused_logprobs_and_entropy(h, w, labels, tp_group=group,
                                               vocab_size=vocab_size, temperature=temperature,
                                               entropy_grad=entropy_grad)
        assert len(calls) - n_calls == 2, where  # MAX [T] + SUM [4, T]
        _close(logp, ref_logp, vtol, vtol, f"logp {where}")
        _close(ent, ref_ent, vtol, vtol, f"entropy {where}")
        loss = (w_logp * logp).sum() + ((w_ent * ent).sum() if entropy_grad else 0.0)
        loss.backward()
        assert len(calls) - n_calls == 3, where  # + SUM of the hidden gradient
        _close(h.grad, ref_gh, rtol, atol * float(ref_gh.abs().max()), f"grad hidden {where}")
        _close(w.grad, ref_gw[rows], rtol, atol * float(ref_gw.abs().max()),
               f"grad weight {where}")
        pad = max(0, min(v_local, (rank + 1) * v_local - vocab_size))
        assert torch.equal(w.grad[v_local - pad:], torch.zeros_like(w.grad[v_local - pad:]))
        checked += 1

    # reduce_hidden_grad=False: each rank keeps its partial; their sum is the gradient.
    gen = torch.Generator().manual_seed(99)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    weight = torch.randn(2 * 20, HIDDEN, generator=gen) * 0.6
    labels = torch.randint(0, 37, (TOKENS,), generator=gen)
    h = hidden.clone().requires_grad_(True)
    logp, _ = fused_logprobs_and_entropy(h, weight[rank * 20:(rank + 1) * 20], labels,
                                         tp_group=group, vocab_size=37,
                                         reduce_hidden_grad=False)
    logp.sum().backward()
    partial = h.grad.clone()
    dist.all_reduce(partial, group=group)
    _, _, ref_gh, _ = _reference(hidden, weight, labels, 37, 1.0,
                                 torch.ones(TOKENS, dtype=torch.float64),
                                 torch.zeros(TOKENS, dtype=torch.float64))
    _close(partial, ref_gh, 1e-4, 1e-5, "reduce_hidden_grad=False")
    return checked


def test_fused_matches_single_process_reference_tp2():
    checked = run_distributed(_check_fused_cases, WORLD)
    assert checked == [len(VOCABS) * len(TEMPERATURE_GRADS) * len(DTYPES)] * WORLD
