"""Rank function for the packed-sequence tests (spawned by the harness).

One world runs several layouts in turn (megatron's parallel state rebuilt for each). Per
layout, the same model trains the same sequences twice through ``Actor.forward_backward``:
one sequence per micro-batch (``[1, S]`` rows), then packed into THD rows under a token
budget by the trainer's own ``micro_batches_for_rank``. The loss is linear in every
response token's log-prob and entropy with fixed per-token weights, so every parameter's
gradient depends on every token. Reported: the largest relative difference of logits (this
rank's vocabulary shard), log-probs, entropies and each parameter gradient.
"""

from __future__ import annotations

import random

import torch

SEQS = [(3, 2), (4, 19), (2, 7), (5, 13), (3, 1), (6, 11), (2, 24)]  # (prompt, response)


def _sequences(vocab: int):
    from megatron_erc.trainer.batch import Sequence

    rng = random.Random(0)
    return [Sequence([rng.randrange(vocab) for _ in range(p)],
                     [rng.randrange(vocab) for _ in range(r)],
                     [rng.uniform(-1, 1) for _ in range(r)],  # per-token loss weights
                     0.0, float(i))  # reward = sequence id
            for i, (p, r) in enumerate(SEQS)]


def _train(actor, minis):
    """Per sequence id: ``(logits, logp, entropy)`` at its response tokens; and the grads."""
    seen = {}

    def loss_fn(logits, mb):
        logp, ent = actor.logprobs(logits, mb.labels, entropy_grad=True)
        w = mb.rollout_logp * mb.loss_mask
        ids = mb.rewards if mb.rewards.dim() == 2 else mb.rewards[:, None].expand_as(w)
        on = mb.loss_mask.bool()
        for sid in ids[on].unique().tolist():
            at = on & (ids == sid)
            seen[int(sid)] = tuple(t[at].detach().float() for t in (logits, logp, ent))
        return (w * logp + 0.5 * w * w * ent).sum(), {}

    actor.forward_backward(minis, loss_fn)
    grads = {f"{i}:{n}": p.main_grad.detach().clone()
             for i, m in enumerate(actor.model) for n, p in m.module.named_parameters()}
    return seen, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / max(b.abs().max().item(), 1e-12))


def compare_packed(rank: int, world: int, hf_dict: dict, layouts: list[dict]) -> list[dict]:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig
    from megatron_erc.trainer.steps import micro_batches_for_rank

    platform.setup()
    d = dict(hf_dict)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    seqs = _sequences(hf.vocab_size)
    out = []
    for lay in layouts:
        platform.init_model_parallel(lay.get("tp", 1), lay.get("pp", 1), seed=3)
        actor = Actor(hf, ParallelConfig(tp=lay.get("tp", 1), pp=lay.get("pp", 1),
                                         sequence_parallel=lay.get("sp", False),
                                         pad_vocab_multiple=1), OptimConfig())
        common = dict(updates=1, dp_size=1, dp_rank=0, seq_len=64, pad_id=0, device="cpu",
                      fixed_shape=lay.get("pp", 1) > 1)
        one = micro_batches_for_rank([seqs], micro_batch_size=1, **common)[0]
        packed = micro_batches_for_rank([seqs], micro_batch_size=1, max_tokens=40,
                                        packed=True, **common)[0]
        assert len(one) == len(seqs) and 1 < len(packed) < len(seqs)
        assert all(mb.cu_seqlens is not None for mb in packed)
        ref, ref_grads = _train(actor, one)
        got, grads = _train(actor, packed)
        errors = {f"grad:{k}": _rel(grads[k], v) for k, v in ref_grads.items()}
        assert set(got) == set(ref), (sorted(got), sorted(ref))
        for sid, tensors in ref.items():
            for what, a, b in zip(("logits", "logp", "entropy"), got[sid], tensors, strict=True):
                errors[f"{what}:{sid}"] = _rel(a, b)
        out.append({"layout": lay, "errors": errors, "last_stage": bool(ref),
                    "n_grads": len(ref_grads)})
        del actor
        ps.destroy_model_parallel()
    return out
