"""Rank functions for ``TrainerOffload``: offload -> reload is bit-exact (parameters, every
optimizer state tensor, main grads, and the next step), and frees resident memory on CPU."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import torch

TINY = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())
N_SEQ, SEQ = 8, 24


def _init() -> None:
    from megatron_erc import platform

    platform.setup()
    platform.init_model_parallel(1, 1, seed=7)


def _actor(params_dtype: str = "float32", distributed_optimizer: bool = False, **model):
    """A tiny actor whose initial weights depend only on the seeds (built twice per case)."""
    from megatron.core import tensor_parallel
    from transformers import AutoConfig

    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig

    d = {k: v for k, v in TINY.items() if k not in ("architectures", "torch_dtype")}
    d.update(model)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    torch.manual_seed(0)
    return Actor(hf, ParallelConfig(pad_vocab_multiple=1, params_dtype=params_dtype),
                 OptimConfig(lr=1e-3, use_distributed_optimizer=distributed_optimizer))


def _micro_batches(vocab: int, seed: int, n_micro: int = 2) -> list:
    from megatron_erc.trainer.batch import MicroBatch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (N_SEQ, SEQ + 1), generator=g)
    mask = (torch.rand(N_SEQ, SEQ, generator=g) < 0.7).float()
    per = N_SEQ // n_micro
    return [MicroBatch(tokens=tokens[i:i + per, :-1], labels=tokens[i:i + per, 1:],
                       loss_mask=mask[i:i + per]) for i in range(0, N_SEQ, per)]


def _train_step(actor, seed: int) -> float:
    """One forward/backward + optimizer step; returns the loss summed over DP ranks."""
    def loss_fn(logits, mb):
        logp, _ = actor.logprobs(logits, mb.labels)
        loss = -(logp * mb.loss_mask).sum() / (N_SEQ * SEQ)
        return loss, {"loss": loss.detach()}

    seed = seed * 101 + torch.distributed.get_rank()  # each DP rank gets its own data
    metrics = actor.forward_backward(_micro_batches(actor.vocab_size, seed), loss_fn)
    applied, _ = actor.step()
    assert applied
    loss = torch.tensor(sum(float(m["loss"]) for m in metrics), dtype=torch.float64)
    torch.distributed.all_reduce(loss)
    return float(loss)


def _snapshot(actor) -> dict[str, torch.Tensor]:
    """Clones of every parameter, main grad, optimizer parameter, its grad and state tensor."""
    out = {}
    for c, chunk in enumerate(actor.model):
        for name, p in chunk.named_parameters():
            out[f"param/{c}/{name}"] = p.detach().clone()
            out[f"main_grad/{c}/{name}"] = p.main_grad.clone()
    inners = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    for i, inner in enumerate(inners):
        opt = inner.optimizer
        for g, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                out[f"opt/{i}/{g}/{j}/main"] = p.detach().clone()
                if p.grad is not None:
                    out[f"opt/{i}/{g}/{j}/grad"] = p.grad.clone()
                for k, v in opt.state[p].items():
                    if isinstance(v, torch.Tensor):
                        out[f"opt/{i}/{g}/{j}/{k}"] = v.clone()
    return out


def _params(actor) -> dict[str, torch.Tensor]:
    return {f"{c}/{n}": p.detach().clone() for c, chunk in enumerate(actor.model)
            for n, p in chunk.named_parameters()}


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def roundtrip_is_bit_exact(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """For each case (``params_dtype``, ``distributed_optimizer``, ``params``): two actors
    from the same seeds take one step; one offloads and reloads; both take a second step.
    Returns, per case, what differs (names; all lists should be empty) and the byte counts."""
    from megatron_erc.trainer.offload import TrainerOffload

    _init()
    results = []
    for case in cases:
        build = {k: case[k] for k in ("params_dtype", "distributed_optimizer")}
        ref, actor = _actor(**build), _actor(**build)
        r = {"init": _differing(_params(ref), _params(actor))}
        _train_step(ref, seed=1)
        _train_step(actor, seed=1)
        before = _snapshot(actor)
        spill = tempfile.mkdtemp(prefix="offload-test-")
        off = TrainerOffload(actor, params=case["params"], spill_dir=spill)
        r["bytes"] = off.offload()
        r["spill_bytes"] = _bytes_under(spill)
        r["bytes_by_kind"] = dict(off.bytes_by_kind)
        grad_buffers = [b.grad_data for chunk in actor.model for b in chunk.buffers]
        r["grads_freed"] = all(g.untyped_storage().nbytes() == 0 for g in grad_buffers)
        r["params_freed"] = all(p.untyped_storage().nbytes() == 0
                                for chunk in actor.model for p in chunk.parameters())
        r["errors"] = []
        try:
            off.offload()
        except RuntimeError as e:
            r["errors"].append(str(e))
        off.reload()
        try:
            off.reload()
        except RuntimeError as e:
            r["errors"].append(str(e))
        r["spill_bytes_after_reload"] = _bytes_under(spill)
        r["after_reload"] = _differing(before, _snapshot(actor))
        r["loss_ref"], r["loss"] = _train_step(ref, seed=2), _train_step(actor, seed=2)
        r["after_step"] = _differing(_snapshot(ref), _snapshot(actor))
        # a second cycle reuses the same spill file / pinned buffer
        r["bytes2"] = off.offload()
        off.reload()
        r["after_reload2"] = _differing(_snapshot(ref), _snapshot(actor))
        off.close()
        os.rmdir(spill)  # empty: close() removed the spill directory
        results.append(r)
    return results


def _bytes_under(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def resident_memory_follows_offload(rank: int, world: int) -> list[dict]:
    """Resident memory of the process before offload, while offloaded and after reload, for
    a model large enough (hidden 256, 4 layers) that the change is far above the noise."""
    from megatron_erc.trainer.offload import TrainerOffload

    _init()
    actor = _actor(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=4)
    _train_step(actor, seed=1)
    out = []
    for params in (False, True):
        off = TrainerOffload(actor, params=params)
        rss0 = _rss()
        moved = off.offload()
        rss1 = _rss()
        off.reload()
        rss2 = _rss()
        out.append({"params": params, "bytes": moved, "by_kind": dict(off.bytes_by_kind),
                    "rss_before": rss0, "rss_offloaded": rss1, "rss_reloaded": rss2})
    return out
