"""Rank functions for the megatron parallel-correctness tests (spawned by the harness).

Every case trains one step through megatron-core's own pipeline schedule and DDP on the
tiny model, with weights copied from a single-process reference, and reports per-parameter
gradient errors and logits errors relative to that reference (full layout, true vocab).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

MICRO_BATCHES = 4
MICRO_BATCH_SIZE = 2
SEQ_LEN = 16


def make_data(vocab_size: int, seed: int = 0):
    """Micro-batches of tokens and the fixed weights of a loss linear in the logits."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ_LEN), generator=g)
    weights = torch.randn(MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ_LEN, vocab_size, generator=g)
    return tokens, weights


def _hf_config(hf_dict: dict):
    from transformers import AutoConfig

    d = dict(hf_dict)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def _loss_func(weights, vocab_size, vocab_start, output):
    """Loss linear in this rank's true-vocabulary logits; returns full logits as metadata.

    Each TP rank backpropagates its own vocabulary slice's share; the column-parallel output
    layer's backward all-reduces the input gradient, so the total gradient is exact.
    """
    logits = output.float()  # [b, s, V/tp]
    local = logits.shape[-1]
    hi = min(vocab_start + local, vocab_size)
    n_true = max(hi - vocab_start, 0)
    loss = (logits[..., :n_true] * weights[..., vocab_start:hi]).sum() / logits.shape[0]
    return loss, {"logits": _gather_vocab(logits.detach(), vocab_size)}


def run_case(rank: int, world: int, hf_dict: dict, par: dict, reference: dict | None,
             apply_platform: bool = True, adapt_p2p: bool = True):
    """One training step on this rank; returns errors against ``reference`` (or, with
    ``reference=None`` on a single rank, the reference itself)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig, build_model_chunks
    from megatron_erc.models.moe import ExpertLoad, moe_loss_metrics, num_experts, sparse_layers
    from megatron_erc.models.sharding import full_state_dict, global_names, iter_local_slices

    if apply_platform:
        platform.setup()
    tp, pp, vpp = par.get("tp", 1), par.get("pp", 1), par.get("vpp")
    ep, etp = par.get("ep", 1), par.get("etp")  # MoE: experts over ep ranks, each over etp
    dp = world // (tp * pp)
    platform.init_model_parallel(tp, pp, vpp, seed=1234, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp or tp)
    hf_config = _hf_config(hf_dict)
    vocab = hf_config.vocab_size
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, pad_vocab_multiple=1, ep=ep, etp=etp,
                              sequence_parallel=par.get("sp", False))
    chunks = build_model_chunks(hf_config, parallel)
    if not adapt_p2p:  # megatron's default p2p settings, as without the platform layer
        chunks[0].config.batch_p2p_comm, chunks[0].config.overlap_p2p_comm = True, False
    tp_rank = ps.get_tensor_model_parallel_rank()
    if reference is not None:
        with torch.no_grad():
            for param, value, _ in iter_local_slices(chunks, reference["state"], tp_rank, tp):
                param.copy_(value)
    state = full_state_dict(chunks[0], vocab) if reference is None else None
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    model = [DistributedDataParallel(config, ddp_config, c) for c in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None

    tokens, weights = make_data(vocab)
    dp_rank = ps.get_data_parallel_rank()
    per_dp = MICRO_BATCHES // dp
    mb_ids = list(range(dp_rank * per_dp, (dp_rank + 1) * per_dp))
    vocab_start = tp_rank * ((vocab + tp - 1) // tp)
    positions = torch.arange(SEQ_LEN).expand(MICRO_BATCH_SIZE, SEQ_LEN)

    def forward_step(data_iterator, chunk):
        i = next(data_iterator)
        out = chunk(tokens[i], positions, None)
        return out, functools.partial(_loss_func, weights[i], vocab, vocab_start)

    def iterators():
        return [iter(mb_ids) for _ in model] if vpp else iter(mb_ids)

    fwd_bwd = get_forward_backward_func()
    common = dict(forward_step_func=forward_step, model=model if vpp else model[0],
                  num_microbatches=per_dp, seq_length=SEQ_LEN, micro_batch_size=MICRO_BATCH_SIZE)
    outputs = fwd_bwd(data_iterator=iterators(), forward_only=True, **common)
    for m in model:
        m.zero_grad_buffer()
    load = None
    if hf_config.model_type == "qwen3_moe":  # the forward above tracked its aux losses too
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        load = ExpertLoad(chunks)
    fwd_bwd(data_iterator=iterators(), forward_only=False, **common)
    moe = {}  # job-level values, the same on every rank
    if load is not None:
        moe = moe_loss_metrics(per_dp, sum(sparse_layers(hf_config)))
        moe.update(load.metrics(hf_config.num_hidden_layers, num_experts(hf_config)))
        load.remove()

    grads = {}
    for chunk in model:
        names = global_names(chunk.module)
        for name, param in chunk.module.named_parameters():
            grads[names[name]] = param.main_grad.detach().clone()

    logits = {}
    if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
        logits = {i: o["logits"] for i, o in zip(mb_ids, outputs, strict=False)}

    if reference is None:
        return {"state": state, "grads": grads, "logits": logits, "moe": moe}

    errors = {}
    ref_grads = reference["grads"]
    for chunk in model:
        for param, expected, gname in iter_local_slices([chunk.module], ref_grads, tp_rank, tp):
            errors[f"grad:{gname}"] = _rel_err(param.main_grad, expected)
    for i, got in logits.items():
        errors[f"logits:{i}"] = _rel_err(got, reference["logits"][i])
    if reference["moe"].keys() != moe.keys():
        raise AssertionError(f"MoE metrics {sorted(moe)}, reference {sorted(reference['moe'])}")
    for k, v in moe.items():
        errors[k] = abs(v - reference["moe"][k]) / max(abs(reference["moe"][k]), 1e-12)
    return {"errors": errors, "n_params": len(grads), "n_logits": len(logits)}


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    scale = expected.abs().max().item()
    return (got - expected).abs().max().item() / max(scale, 1e-12)
