"""Rank functions for trainer tests: loss/gradient invariance to the micro-batch split and
the data-parallel size, and the non-finite-step guard."""

from __future__ import annotations

import json
import pathlib

import torch

from megatron_erc.trainer.batch import MicroBatch

TINY = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())
N_SEQ, SEQ = 16, 24


def _setup(tp: int = 1, **optim):
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.algorithms import ErcConfig, PolicyLossConfig
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig
    from megatron_erc.trainer.config import TrainConfig

    platform.setup()
    platform.init_model_parallel(tp, 1, seed=7)
    d = {k: v for k, v in TINY.items() if k not in ("architectures", "torch_dtype")}
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    actor = Actor(hf, ParallelConfig(tp=tp, pad_vocab_multiple=1),
                  OptimConfig(**{"lr": 1e-3, **optim}))
    cfg = TrainConfig(algo=PolicyLossConfig(erc=ErcConfig(low=0.95, high=1.05), dual_clip=10.0,
                                            pos_nll_coef=0.1))
    return actor, cfg


def _batch(vocab: int) -> MicroBatch:
    """A fixed rollout batch: random tokens, ragged response masks, advantages, rewards, and
    stale old log-probs/entropies so clipping and ERC both act."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (N_SEQ, SEQ + 1), generator=g)
    mask = torch.zeros(N_SEQ, SEQ)
    for i in range(N_SEQ):
        start = int(torch.randint(3, 8, (1,), generator=g))
        end = int(torch.randint(start + 2, SEQ + 1, (1,), generator=g))
        mask[i, start:end] = 1
    rewards = (torch.arange(N_SEQ) % 3 == 0).float()
    # how far the policy moved since the rollout (stale old values, per token), carried in
    # the old_* fields until the test applies them
    return MicroBatch(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                      advantages=torch.randn(N_SEQ, generator=g), rewards=rewards,
                      rollout_logp=torch.zeros(N_SEQ, SEQ),
                      old_logp=0.3 * torch.randn(N_SEQ, SEQ, generator=g),
                      old_entropy=0.1 * torch.randn(N_SEQ, SEQ, generator=g))


def grads_for_split(rank: int, world: int, micro_batch_size: int):
    """Loss and full gradients of one policy-loss mini-batch; with world > 1 the sequences
    are split across data-parallel ranks."""
    from megatron_erc.trainer.batch import split
    from megatron_erc.trainer.steps import policy_loss_fn, score_old_logprobs

    actor, cfg = _setup()
    batch = _batch(actor.vocab_size)
    per = N_SEQ // world
    mine = batch.rows(slice(rank * per, (rank + 1) * per))
    micro = split(mine, micro_batch_size)
    noise = [(mb.old_logp, mb.old_entropy) for mb in micro]
    score_old_logprobs(actor, micro)
    for mb, (logp, ent) in zip(micro, noise, strict=True):  # pretend the policy moved since
        mb.old_logp = mb.old_logp + logp                     # the rollout: stale old values
        mb.old_entropy = mb.old_entropy * (1 + ent)
    metrics = actor.forward_backward(micro, policy_loss_fn(cfg, actor, micro))
    loss = torch.tensor(sum(float(m["loss"]) for m in metrics), dtype=torch.float64)
    dropped = sum(float(m["erc/dropped_frac"]) for m in metrics)
    if world > 1:
        torch.distributed.all_reduce(loss)
    grads = {n: p.main_grad.clone() for n, p in actor.model[0].module.named_parameters()}
    return {"loss": float(loss), "grads": grads, "erc_dropped": dropped}


def nonfinite_step_is_skipped(rank: int, world: int):
    from megatron_erc.trainer.batch import split

    actor, _ = _setup()
    batch = _batch(actor.vocab_size)
    before = {n: p.detach().clone() for n, p in actor.model[0].module.named_parameters()}

    def nan_loss(logits, mb):
        logp, _ = actor.logprobs(logits, mb.labels)
        return (logp * mb.loss_mask).sum() * float("nan"), {}

    actor.forward_backward(split(batch, 8), nan_loss)
    applied, norm = actor.step()
    unchanged = all(torch.equal(before[n], p) for n, p in actor.model[0].module.named_parameters())

    def good_loss(logits, mb):
        logp, _ = actor.logprobs(logits, mb.labels)
        return -(logp * mb.loss_mask).sum() / 100, {}

    actor.forward_backward(split(batch, 8), good_loss)
    applied2, norm2 = actor.step()
    changed = any(not torch.equal(before[n], p)
                  for n, p in actor.model[0].module.named_parameters())
    return {"applied": applied, "norm": norm, "unchanged": unchanged, "applied2": applied2,
            "norm2": norm2, "changed": changed}


def grads_after_a_step_are_not_double_counted(rank: int, world: int):
    """After an optimizer step, the next forward/backward must give the same gradients as a
    repeat of it (megatron's optimizer leaves param.grad aliasing main_grad)."""
    from megatron_erc.trainer.batch import split

    actor, _ = _setup()
    batch = _batch(actor.vocab_size)

    def loss_fn(logits, mb):
        logp, _ = actor.logprobs(logits, mb.labels)
        return -(logp * mb.loss_mask).sum() / 100, {}

    actor.forward_backward(split(batch, 8), loss_fn)
    assert actor.step()[0]
    grads = []
    for _ in range(2):
        actor.forward_backward(split(batch, 8), loss_fn)
        grads.append({n: p.main_grad.clone() for n, p in actor.model[0].module.named_parameters()})
    return max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])


def lr_schedule(rank: int, world: int):
    """Learning rate after each optimizer step: linear warmup, then cosine decay."""
    from megatron_erc.trainer.batch import split

    actor, _ = _setup(lr=1e-3, warmup_steps=2, decay_steps=4, decay_style="cosine",
                      min_lr=1e-4)
    batch = _batch(actor.vocab_size)

    def loss_fn(logits, mb):
        logp, _ = actor.logprobs(logits, mb.labels)
        return -(logp * mb.loss_mask).sum() / 100, {}

    lrs = [actor.lr()]
    for _ in range(7):
        actor.forward_backward(split(batch, 16), loss_fn)
        assert actor.step()[0]
        lrs.append(actor.lr())
    return lrs


def onpolicy_old_logprobs_from_the_update_forward(rank: int, world: int):
    """The first mini-batch of a rollout takes ``old_logp``/``old_entropy`` from its own update
    forward instead of a separate scoring pass: the numbers, loss and gradients must match."""
    from megatron_erc.trainer.batch import split
    from megatron_erc.trainer.steps import policy_loss_fn, score_old_logprobs

    actor, cfg = _setup()
    batch = _batch(actor.vocab_size)
    out = {}
    batch.old_logp = batch.old_entropy = None
    for way in ("scored", "own_forward"):
        micro = split(batch, 8)
        if way == "scored":
            score_old_logprobs(actor, micro)
        metrics = actor.forward_backward(micro, policy_loss_fn(cfg, actor, micro))
        out[way] = {
            "old_logp": torch.cat([mb.old_logp for mb in micro]),
            "old_entropy": torch.cat([mb.old_entropy for mb in micro]),
            "loss": sum(float(m["loss"]) for m in metrics),
            "grads": {n: p.main_grad.clone() for n, p in actor.model[0].module.named_parameters()}}
    a, b = out["scored"], out["own_forward"]
    mask = batch.loss_mask.bool()
    return {"logp": float((a["old_logp"] - b["old_logp"])[mask].abs().max()),
            "entropy": float((a["old_entropy"] - b["old_entropy"])[mask].abs().max()),
            "loss": (a["loss"], b["loss"]),
            "grads": max(float((a["grads"][n] - b["grads"][n]).abs().max()) for n in a["grads"]),
            "grad_scale": max(float(g.abs().max()) for g in a["grads"].values())}
