"""The actor: megatron model chunks + DDP + optimizer, driven through megatron's schedule.

Micro-batches are ``batch.MicroBatch`` objects on the model's device: ``tokens`` (input ids),
``labels`` (next token ids), ``loss_mask`` (1 on tokens that enter the loss) ``[b, s]`` plus
whatever the loss needs.
A loss callback receives this rank's vocabulary-sharded logits and returns
``(loss, metrics)``; vocabulary-parallel log-probs come from ``ops.logprobs_and_entropy``.

megatron-core is imported inside the functions that use it: it takes seconds to
import, and the commands check their inputs before it loads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch

from megatron_erc.models import ParallelConfig, build_model_chunks
from megatron_erc.models.fused_output import FusedOutput
from megatron_erc.models.hf_adapter import iter_hf_weights
from megatron_erc.models.pipeline_weights import all_stage_weights
from megatron_erc.ops.fused_linear import fused_available
from megatron_erc.ops.vocab_parallel import chunk_rows, logprobs_and_entropy
from megatron_erc.platform import detect, require_supported_megatron
from megatron_erc.trainer.batch import MicroBatch

LossFn = Callable[[torch.Tensor, "MicroBatch"], tuple[torch.Tensor, dict]]


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and schedule of the actor."""

    lr: float = 1e-6
    """Peak learning rate (the published ERC recipe uses 1e-6)."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron's distributed optimizer)."""
    warmup_steps: int = 0
    """Linear learning-rate warmup from 0, in optimizer steps (the ERC recipe uses 10)."""
    decay_steps: int | None = None
    """Optimizer steps over which ``decay_style`` runs after warmup; None: constant."""
    decay_style: str = "constant"
    """``constant``, ``linear`` or ``cosine`` (to ``min_lr``)."""
    min_lr: float = 0.0
    """Floor of the decaying schedule."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.decay_style must be constant, linear or cosine, "
                             f"got {self.decay_style!r}")
        if self.decay_style != "constant" and not self.decay_steps:
            raise ValueError("optim.decay_steps must be set for a linear or cosine decay")
        if self.decay_style == "constant" and (self.decay_steps or self.min_lr):
            raise ValueError(
                f"optim.decay_steps ({self.decay_steps}) and optim.min_lr ({self.min_lr}) shape "
                "a decaying schedule and have no effect with optim.decay_style=constant; set "
                "decay_style to linear or cosine, or leave them unset")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr], got {self.min_lr}")
        if not self.clip_grad > 0:
            raise ValueError(f"optim.clip_grad must be > 0 (use a large value to disable), "
                             f"got {self.clip_grad}")


class Actor:
    """This rank's part of the policy model, its optimizer and the forward/backward driver."""

    def __init__(self, hf_config, parallel: ParallelConfig, optim: OptimConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        # step() and checkpointing use megatron's private optimizer APIs (prepare_grads,
        # step_with_ready_grads, optimizer internals): pinned to the release they were
        # written against, on every platform
        require_supported_megatron("the actor's optimizer step and checkpoints")
        self.hf_config, self.parallel = hf_config, parallel
        self.moe = None
        """``trainer.moe_step.MoESteps`` of an MoE actor in an RL run (routing replay, moe/*
        metrics; set by the trainer); None otherwise."""
        # where micro-batches must live: this rank's GPU (set by init_process_group) or the CPU
        self.device = torch.device("cpu") if detect().is_cpu else \
            torch.device("cuda", torch.cuda.current_device())
        self.vocab_size = hf_config.vocab_size
        chunks = build_model_chunks(hf_config, parallel)
        self.fused = _fused_output(chunks, parallel, self.device)
        self.config = chunks[0].config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=optim.use_distributed_optimizer)
        self.model = [DistributedDataParallel(self.config, ddp_config, c) for c in chunks]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            clip_grad=optim.clip_grad, adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
            bf16=parallel.params_dtype == "bfloat16", params_dtype=self.config.params_dtype,
            use_distributed_optimizer=optim.use_distributed_optimizer), self.model)
        self.config.grad_scale_func = self.optimizer.scale_loss
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.lr_scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr,
            min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=optim.warmup_steps + (optim.decay_steps or 1),
            lr_decay_style=optim.decay_style, start_wd=optim.weight_decay,
            end_wd=optim.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()

    def logprobs(self, logits: torch.Tensor, labels: torch.Tensor, *, chunk_mb: int = 64,
                 **kwargs):
        """``(logp, entropy)`` ``[b, s]`` from this rank's ``[b, s, V/tp]`` logits; reduces
        over the TP group only; padding ids of the vocabulary get zero probability. Tokens are
        processed in chunks whose fp32 work buffers fit in ``chunk_mb`` MiB
        (``algo.logprob_chunk_mb``)."""
        if self.fused is not None:  # ``logits`` are the output layer's input [b, s, H]
            return self.fused.logprobs(logits, labels, tp_group=self.tp_group,
                                       tp_rank=self.tp_rank, vocab_size=self.vocab_size,
                                       chunk_mb=chunk_mb, **kwargs)
        v_local = logits.shape[-1]
        return logprobs_and_entropy(logits, labels, tp_group=self.tp_group,
                                    vocab_start=self.tp_rank * v_local,
                                    vocab_size=self.vocab_size,
                                    chunk_size=chunk_rows(chunk_mb, v_local), **kwargs)

    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, *,
                         forward_only: bool = False) -> list[dict]:
        """Run all micro-batches through megatron's pipeline schedule.

        ``loss_fn(logits [b, s, V/tp], batch) -> (loss, metrics)`` runs on the last pipeline
        stage; the schedule divides nothing (``loss_fn`` normalises by the global token
        count itself). Returns the metrics dicts of the last stage (empty elsewhere).
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not micro_batches:
            return []
        b, s = micro_batches[0].tokens.shape
        if self.parallel.pp > 1 and len({mb.tokens.shape for mb in micro_batches}) > 1:
            raise ValueError("pipeline stages exchange one activation shape: every micro-batch "
                             "must have the same [b, s] (see steps.micro_batches_for_rank)")

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            out = chunk(batch.tokens, _positions(batch), None,
                        packed_seq_params=_packed_seq_params(batch))
            return out, functools.partial(_call_loss, loss_fn, batch,
                                          len(micro_batches) * self.dp_size)

        vpp = self.parallel.vpp
        iterators = [iter(micro_batches) for _ in self.model] if vpp else iter(micro_batches)
        if not forward_only:
            for m in self.model:
                m.zero_grad_buffer()
            # The optimizer leaves param.grad aliasing main_grad after a step; autograd would
            # then accumulate the first micro-batch into main_grad and DDP's hook add it again.
            self.optimizer.zero_grad()
        self.config.calculate_per_token_loss = False
        with torch.set_grad_enabled(not forward_only):
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators,
                model=self.model if vpp else self.model[0], num_microbatches=len(micro_batches),
                seq_length=s, micro_batch_size=b, forward_only=forward_only)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def hf_weights(self):
        """This pipeline stage's weights as ``(hf_name, full tensor)`` pairs, TP shards
        gathered over the TP group (every TP rank must iterate)."""

        tp = self.tp_group if self.parallel.tp > 1 else None
        return iter_hf_weights(self.model, self.hf_config, tp_group=tp)

    def full_hf_weights(self):
        """The whole model's ``(hf_name, full tensor)`` pairs on every rank (weight sync into
        each rank's engine, HF export). Every rank must exhaust the iterator: TP ranks gather
        their shards in lockstep, each pipeline stage broadcasts its layers to the others."""

        weights = self.hf_weights()
        return all_stage_weights(weights, self.pp_group) if self.parallel.pp > 1 else weights

    def step(self) -> tuple[bool, float]:
        """Optimizer step. Returns ``(applied, grad_norm)``; a non-finite grad norm skips it.

        megatron's fp32 optimizer steps even on NaN/inf gradients, so the norm is looked at
        first; the step then reuses it (megatron's ``step()`` would copy the gradients to the
        main parameters and reduce the norm over the model-parallel group a second time).
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        if opt.prepare_grads():  # mixed precision found inf/nan
            opt.zero_grad()
            return False, float("nan")
        norm = float(opt.get_grad_norm())
        if not math.isfinite(norm):
            opt.zero_grad()
            return False, norm
        for inner in getattr(opt, "chained_optimizers", [opt]):  # clip as megatron's step()
            params = inner.get_parameters()
            if params and inner.config.clip_grad > 0:
                clip_grad_by_total_norm_fp32(
                    params, max_norm=inner.config.clip_grad, total_norm=norm,
                    use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        if not opt.step_with_ready_grads():
            return False, norm
        self.lr_scheduler.step(increment=1)
        return True, norm


def _fused_output(chunks, parallel: ParallelConfig, device) -> FusedOutput | None:
    """The fused output layer where ``parallel.fused_output_layer`` asks for it (None: where
    Triton and a GPU are available)."""
    want = parallel.fused_output_layer
    available = fused_available(device)
    if want and not available:
        raise ValueError("parallel.fused_output_layer=true needs Triton and CUDA (or "
                         "TRITON_INTERPRET=1 for a slow CPU check); set it to null or false")
    if not (available if want is None else want):
        return None
    return FusedOutput(chunks, parallel.sequence_parallel)


def torch_optimizers(optimizer) -> list:
    """The ``torch.optim`` optimizers (state, parameter groups) inside a (chained) megatron
    optimizer."""
    inner = getattr(optimizer, "chained_optimizers", None)
    if inner is not None:
        return [t for o in inner for t in torch_optimizers(o)]
    return [optimizer.optimizer] if getattr(optimizer, "optimizer", None) is not None else []


def _positions(batch: MicroBatch) -> torch.Tensor:
    """``[b, s]`` position ids; packed rows restart at every segment. (RoPE models take their
    positions from ``packed_seq_params``; these matter to learned position embeddings.)"""
    b, s = batch.tokens.shape
    if batch.cu_seqlens is None:
        return torch.arange(s, device=batch.tokens.device).expand(b, s)
    cu = batch.cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=s)
    return (torch.arange(s, device=cu.device) - starts)[None]


def _packed_seq_params(batch: MicroBatch):
    """megatron's THD description of a packed micro-batch (None for one sequence per row)."""
    if batch.cu_seqlens is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens,
                           cu_seqlens_kv=batch.cu_seqlens, max_seqlen_q=batch.max_seqlen,
                           max_seqlen_kv=batch.max_seqlen)


def _call_loss(loss_fn: LossFn, batch: MicroBatch, undo_scale: int, output: torch.Tensor):
    loss, metrics = loss_fn(output, batch)
    # megatron divides the loss by the number of micro-batches and DDP averages gradients over
    # data-parallel ranks; our losses are already normalised by the global token count of the
    # whole mini-batch (all micro-batches, all DP ranks), so undo both.
    return loss * undo_scale, metrics
