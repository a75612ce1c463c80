"""Log-prob of the label and full-vocabulary entropy straight from the output layer's input.

``fused_logprobs_and_entropy(hidden [T, H], weight [V/tp, H], labels [T])`` equals
``logprobs_and_entropy(hidden @ weight.T, labels)`` (``ops.vocab_parallel``) without ever
materialising the ``[T, V/tp]`` logits, forward or backward (the approach of verl's and
Transformer Engine's ``linear_cross_entropy``):

- forward: a Triton kernel forms logits tiles ``[BT, BV]`` in registers (``tl.dot`` over
  ``H``) and folds them into the online-softmax statistics of ``softmax_stats`` per
  vocabulary split; splits merge locally, then ranks merge through
  ``softmax_stats.combine_over_group`` (all_reduce MAX ``[T]`` + SUM ``[4, T]``: the same
  combine as the unfused op). Saved for backward: ``hidden`` and ``weight`` (by reference)
  and ``shift = log Z`` ``[T]``.
- backward: for one vocabulary chunk at a time (``[T, chunk]`` within ``chunk_mb``), a
  second kernel recomputes the logits tiles and writes ``dL/dz`` (equations in
  ``vocab_parallel``); two GEMMs give ``dW[chunk] = dz^T h`` and ``dh += dz W[chunk]``.
  ``dh`` is summed over the group (each rank saw only its vocabulary), as Megatron's
  ``copy_to_tensor_model_parallel_region`` does for the unfused output layer.

Padding ids (``>= vocab_size``) get exactly zero probability and zero weight gradient.
Triton is optional: ``fused_available`` says whether this path can run (CUDA tensors, or
any tensors under ``TRITON_INTERPRET=1``, which CI uses to prove it exact on CPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.distributed as dist

from megatron_erc.ops.softmax_stats import combine_over_group, vocab_shard

__all__ = ["fused_available", "fused_logprobs_and_entropy"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_available(device: torch.device | str | None = None) -> bool:
    """True when the fused kernels can run on tensors of ``device``: Triton is importable
    and either the device is CUDA (with a GPU present) or ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    device = torch.device(device) if device is not None else None
    return (device is not None and device.type == "cuda" and torch.cuda.is_available())


def _kernels():
    from megatron_erc.ops import _fused_linear_triton

    return _fused_linear_triton


def _merge_splits(parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[4, n_split, T]`` per-split ``(m, s, a, z_label)`` -> ``(m, s, a, z_label)`` ``[T]``
    (every split holds real columns, so every ``m`` is finite)."""
    m, s, a, tgt = parts
    if m.shape[0] == 1:
        return m[0], s[0], a[0], tgt[0]
    new_m = m.amax(dim=0)
    d = m - new_m
    c = torch.exp(d)
    return (new_m, (s * c).sum(0), (c * (a + d * s)).sum(0), tgt.sum(0))


class _FusedLinearLogprobEntropy(torch.autograd.Function):
    """``hidden [T, H]``, ``weight [V/tp, H]``, ``labels [T]`` -> ``(logp, entropy)`` fp32
    ``[T]``; collectives over ``group``: forward MAX ``[T]`` + SUM ``[4, T]``, backward
    (``reduce_hidden_grad``) SUM of ``dh [T, H]``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start, n_valid, inv_temp,
                entropy_grad, reduce_hidden_grad, chunk_bytes):
        k = _kernels()
        local = labels - vocab_start
        num_rows = hidden.shape[0]
        hits = ((local >= 0) & (local < n_valid)).float()
        if n_valid > 0 and num_rows > 0:
            m, s, a, target = _merge_splits(k.local_stats(hidden, weight, local, n_valid,
                                                          inv_temp))
        else:  # an all-padding shard: the empty part
            kw = {"dtype": torch.float32, "device": hidden.device}
            m = torch.full((num_rows,), float("-inf"), **kw)
            s, a, target = (torch.zeros(num_rows, **kw) for _ in range(3))
        logp, entropy, shift = combine_over_group(m, s, a, target, hits, inv_temp, group)
        ctx.meta = (group, n_valid, inv_temp, entropy_grad, reduce_hidden_grad, chunk_bytes)
        if entropy_grad:
            ctx.save_for_backward(hidden, weight, local, shift, entropy)
        else:
            ctx.save_for_backward(hidden, weight, local, shift)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        group, n_valid, inv_temp, entropy_grad, reduce_hidden_grad, chunk_bytes = ctx.meta
        hidden, weight, local, shift, *rest = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_rows, hidden_size = hidden.shape
        # dL/dz = p (k1 log p + k0) + onehot g, with g = g_logp / T (see vocab_parallel).
        g_logp = grad_logp.float()
        coef = torch.empty(4, num_rows, dtype=torch.float32, device=hidden.device)
        coef[0] = shift
        coef[3] = g_logp * inv_temp
        if entropy_grad:
            g_ent = grad_entropy.float()
            torch.mul(g_ent, -inv_temp, out=coef[1])
            torch.addcmul(g_logp, g_ent, rest[0], out=coef[2]).mul_(-inv_temp)
        else:
            coef[1].zero_()
            torch.mul(g_logp, -inv_temp, out=coef[2])

        grad_w = torch.zeros_like(weight) if need_w else None  # padding rows stay 0
        grad_h = torch.zeros(num_rows, hidden_size, dtype=torch.float32,
                             device=hidden.device) if need_h else None
        if n_valid > 0 and num_rows > 0:
            k = _kernels()
            per_col = num_rows * hidden.element_size()
            chunk = max(k.BV, (chunk_bytes // per_col) // k.BV * k.BV)
            buf = torch.empty(num_rows * min(chunk, n_valid), dtype=hidden.dtype,
                              device=hidden.device)
            for c0 in range(0, n_valid, chunk):
                c1 = min(c0 + chunk, n_valid)
                dz = buf[:num_rows * (c1 - c0)].view(num_rows, c1 - c0)
                k.dlogits(hidden, weight, local, coef, c0, dz, inv_temp)
                if need_w:
                    torch.mm(dz.t(), hidden, out=grad_w[c0:c1])
                if need_h:
                    part = torch.mm(dz, weight[c0:c1])
                    grad_h.add_(part)
                    del part
        if need_h:
            grad_h = grad_h.to(hidden.dtype)
            if reduce_hidden_grad and group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=group)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def fused_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    entropy_grad: bool = False,
    reduce_hidden_grad: bool = True,
    chunk_mb: float = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_and_entropy(hidden @ weight.T, labels, ...)`` without the logits.

    Args:
        hidden: ``[..., H]`` input of the output layer (after the final norm), the same on
            every rank of ``tp_group`` (under sequence parallelism: already gathered).
            fp32, bf16 or fp16; made contiguous if it is not.
        weight: ``[V/tp, H]`` this rank's shard of the output weight (Megatron's
            ``output_layer.weight``, or the shared embedding weight when tied), same dtype.
        labels: ``[...]`` global token ids, ``hidden.shape[:-1]``.
        tp_group: group the vocabulary is sharded over. ``None``: not sharded.
        vocab_start: first global id of this shard; default ``rank(tp_group) * V/tp``.
        vocab_size: true vocabulary size; ids ``>= vocab_size`` are padding and get exactly
            zero probability. Default ``world_size(tp_group) * V/tp``.
        temperature: logits are divided by it first (> 0).
        entropy_grad: make ``entropy`` differentiable too (default: a mask, no graph).
        reduce_hidden_grad: sum the hidden-state gradient over ``tp_group`` (default, as
            Megatron's ``ColumnParallelLinear`` does). ``False`` when the caller's own
            region op reduces it, e.g. ``gather_from_sequence_parallel_region`` with its
            default ``tensor_parallel_output_grad=True`` under sequence parallelism.
        chunk_mb: budget (MiB) of the backward's ``[T, chunk]`` buffer of ``dL/dz`` (in
            the inputs' dtype; at least one kernel block of columns); the logits are never
            stored whole.

    Returns:
        ``(logp, entropy)``, fp32 ``[...]`` shaped like ``labels``; ``logp = -inf`` for a
        label outside ``[0, vocab_size)``. Gradients flow to ``hidden`` and ``weight``.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [..., H] and weight [V_local, H]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype among fp32/bf16/fp16; got "
                        f"{hidden.dtype} and {weight.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden shape "
                         f"without the hidden dim {tuple(hidden.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not chunk_mb > 0:
        raise ValueError(f"chunk_mb must be > 0 (MiB), got {chunk_mb}")
    if not fused_available(hidden.device):
        raise RuntimeError("the fused output layer needs Triton and CUDA tensors (or "
                           "TRITON_INTERPRET=1); use ops.logprobs_and_entropy on the logits")
    vocab_start, n_valid = vocab_shard(weight.shape[0], tp_group, vocab_start, vocab_size)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    logp, entropy = _FusedLinearLogprobEntropy.apply(
        h2, weight.contiguous(), labels.reshape(-1).long(), tp_group, vocab_start, n_valid,
        1.0 / float(temperature), bool(entropy_grad), bool(reduce_hidden_grad),
        int(chunk_mb * (1 << 20)))
    return logp.view(labels.shape), entropy.view(labels.shape)
