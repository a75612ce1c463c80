"""Log-probabilities and entropy over a vocabulary sharded across tensor-parallel ranks.

ERC needs two things from every forward pass: the log-prob of the sampled token (with an
exact gradient) and the entropy of the *whole* next-token distribution (only as a mask, so
by default without a graph). Both come from the same softmax statistics, so one pass over
the logits serves both.

Layout follows Megatron's ``vocab_parallel_cross_entropy``: collective-free local helpers
(``_local_*``) and one ``torch.autograd.Function`` that does the reductions over the group
it is given. Nothing reads Megatron's global ``parallel_state``.

Per token, with ``u = z / temperature`` over the (unpadded) global vocabulary::

    m      = max_v u_v                       all_reduce MAX over tp_group
    S      = sum_v exp(u_v - m)              \\
    A      = sum_v exp(u_v - m) (u_v - m)     } one all_reduce SUM of a stacked [4, T]
    z_t    = z[label] (0 off-rank), hit      /
    logp   = (z_t / temperature - m) - log S
    H      = log S - A / S                   (= -sum_v p_v log p_v)

Backward recomputes the softmax chunk by chunk from the saved logits (as given, no fp32
copy) and the per-token ``m`` and ``log S``:

    dlogp/dz_v = (onehot_v(label) - p_v) / temperature
    dH/dz_v    = -p_v (log p_v + H) / temperature
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["logprobs_and_entropy"]


# ----------------------------------------------------------------------------------------
# Collective-free local helpers. ``x`` is always the 2-D view ``[T, V_local]`` restricted
# to the non-padding columns ``[:, :n_valid]``; ``shift`` is ``[T]`` fp32.
# ----------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for bf16/fp16/fp32 input; float64 input (tests) stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(num_rows: int, chunk: int) -> Iterator[slice]:
    for start in range(0, num_rows, chunk):
        yield slice(start, min(start + chunk, num_rows))


def _scaled_minus(x: torch.Tensor, shift: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """``inv_temp * x - shift[:, None]`` as a new fp32 tensor ``[C, V]`` in one kernel.

    Type promotion does the fp32 upcast of bf16 ``x`` element by element, so no separate
    fp32 copy of ``x`` is made.
    """
    if inv_temp == 1.0:
        return torch.sub(x, shift.unsqueeze(-1))
    return torch.add(shift.neg().unsqueeze(-1), x, alpha=inv_temp)


def _local_max(x: torch.Tensor, inv_temp: float, acc_dtype: torch.dtype) -> torch.Tensor:
    """Per-row max of ``x / temperature`` over this slice: ``[T, V] -> [T]`` in
    ``acc_dtype``.

    Dividing by a positive temperature commutes with max, so this reads ``x`` as given.
    An all-padding slice contributes ``-inf``.
    """
    if x.shape[-1] == 0:
        return torch.full(x.shape[:1], float("-inf"), dtype=acc_dtype, device=x.device)
    return x.amax(dim=-1).to(acc_dtype).mul_(inv_temp)


def _local_sums(x: torch.Tensor, gmax: torch.Tensor, inv_temp: float, chunk: int,
                out: torch.Tensor) -> None:
    """Fill ``out[0] = sum exp(u - m)`` and ``out[1] = sum exp(u - m) (u - m)`` over this
    slice, ``chunk`` rows at a time (``x``: ``[T, V]``, ``gmax``/``out[i]``: ``[T]``).

    Peak extra memory is two fp32 ``[chunk, V]`` buffers; accumulation is fp32.
    """
    if x.shape[-1] == 0:
        out[:2].zero_()
        return
    for rows in _row_chunks(x.shape[0], chunk):
        y = _scaled_minus(x[rows], gmax[rows], inv_temp)
        e = torch.exp(y)
        torch.sum(e, dim=-1, out=out[0, rows])
        torch.sum(e.mul_(y), dim=-1, out=out[1, rows])
        del y, e


def _local_target(x: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                  out: torch.Tensor) -> None:
    """Fill ``out[0]`` with the raw logit of each row's label when this slice owns it
    (else 0) and ``out[1]`` with 1.0 where owned (else 0): ``[T, V], [T] -> [2, T]``."""
    local = labels - vocab_start
    hit = (local >= 0) & (local < x.shape[-1])
    if x.shape[-1] == 0:
        out.zero_()
        return
    picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    out[0].copy_(picked).masked_fill_(~hit, 0.0)
    out[1].copy_(hit)


def _local_grad(x: torch.Tensor, labels: torch.Tensor, vocab_start: int, shift: torch.Tensor,
                inv_temp: float, g_logp: torch.Tensor, g_ent: torch.Tensor | None,
                entropy: torch.Tensor | None) -> torch.Tensor:
    """Gradient w.r.t. one chunk of local logits ``x`` (``[C, V]``), fp32 ``[C, V]``.

    ``shift = m + log S`` so that ``inv_temp * x - shift = log p``. ``g_logp``, ``g_ent``,
    ``entropy``: ``[C]``. Rows whose label lives on another rank get no one-hot term.
    """
    if x.shape[-1] == 0:  # an all-padding slice
        return torch.empty(x.shape, dtype=shift.dtype, device=x.device)
    logp = _scaled_minus(x, shift, inv_temp)
    if g_ent is None:
        grad = logp.exp_().mul_(g_logp.mul(-inv_temp).unsqueeze(-1))
    else:
        # -p * (g_logp + g_ent * (log p + H)) / T
        p = torch.exp(logp)
        coef = logp.add_(entropy.unsqueeze(-1)).mul_(g_ent.unsqueeze(-1))
        coef.add_(g_logp.unsqueeze(-1))
        grad = p.mul_(coef).mul_(-inv_temp)
        del logp, coef
    # One-hot term as a masked scatter (no data-dependent indexing, so no host sync).
    local = labels - vocab_start
    hit = (local >= 0) & (local < x.shape[-1])
    onehot = torch.where(hit, g_logp * inv_temp, 0.0).unsqueeze(-1)
    grad.scatter_add_(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1), onehot)
    return grad


# ----------------------------------------------------------------------------------------
# The autograd Function: the only place with collectives.
# ----------------------------------------------------------------------------------------


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Forward: ``logits [..., V/tp]``, ``labels [...]`` -> ``(logp, entropy)`` fp32
    ``[...]``. Two collectives over ``group`` for the whole batch, whatever the chunking:
    all_reduce MAX of ``[T]`` and all_reduce SUM of ``[4, T]``."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, n_valid, inv_temp, chunk,
                entropy_grad):
        v_local = logits.shape[-1]
        x = logits.reshape(-1, v_local)[:, :n_valid]
        flat_labels = labels.reshape(-1)
        num_rows = x.shape[0]
        distributed = group is not None and dist.get_world_size(group) > 1

        acc_dtype = _acc_dtype(logits.dtype)
        gmax = _local_max(x, inv_temp, acc_dtype)
        if distributed:
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)

        stats = torch.empty(4, num_rows, dtype=acc_dtype, device=logits.device)
        _local_sums(x, gmax, inv_temp, chunk, stats[:2])
        _local_target(x, flat_labels, vocab_start, stats[2:])
        if distributed:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        sum_exp, sum_exp_u, target, hits = stats

        log_sum_exp = sum_exp.log()
        entropy = log_sum_exp - sum_exp_u / sum_exp
        logp = target.mul_(inv_temp).sub_(gmax).sub_(log_sum_exp)
        # A label outside [0, vocab_size) (padding id, ignore index) has zero probability.
        logp.masked_fill_(hits == 0, float("-inf"))

        shift = gmax.add_(log_sum_exp)  # log p = inv_temp * z - shift
        ctx.meta = (vocab_start, n_valid, inv_temp, chunk, entropy_grad)
        logp = logp.clone().view(labels.shape)  # not a view of the [4, T] stats buffer
        entropy_out = entropy.view(labels.shape)
        if entropy_grad:
            ctx.save_for_backward(logits, labels, shift, entropy)
        else:
            ctx.save_for_backward(logits, labels, shift)
            ctx.mark_non_differentiable(entropy_out)
        return logp, entropy_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        vocab_start, n_valid, inv_temp, chunk, entropy_grad = ctx.meta
        logits, labels, shift, *rest = ctx.saved_tensors
        entropy = rest[0] if entropy_grad else None
        v_local = logits.shape[-1]
        x = logits.reshape(-1, v_local)[:, :n_valid]
        flat_labels = labels.reshape(-1)
        acc_dtype = _acc_dtype(logits.dtype)
        g_logp = grad_logp.reshape(-1).to(acc_dtype)
        g_ent = grad_entropy.reshape(-1).to(acc_dtype) if entropy_grad else None
        num_rows = x.shape[0]

        if chunk >= num_rows and n_valid == v_local and logits.dtype == acc_dtype:
            # One chunk covering everything: the fp32 result already is the gradient.
            grad = _local_grad(x, flat_labels, vocab_start, shift, inv_temp, g_logp, g_ent,
                               entropy)
            return grad.view(logits.shape), None, None, None, None, None, None, None

        grad = torch.empty((num_rows, v_local), dtype=logits.dtype, device=logits.device)
        grad[:, n_valid:].zero_()  # padding ids have zero probability: zero gradient
        for rows in _row_chunks(num_rows, chunk):
            grad[rows, :n_valid] = _local_grad(
                x[rows], flat_labels[rows], vocab_start, shift[rows], inv_temp, g_logp[rows],
                None if g_ent is None else g_ent[rows],
                None if entropy is None else entropy[rows])
        return grad.view(logits.shape), None, None, None, None, None, None, None


def chunk_rows(budget_mb: int, local_vocab: int) -> int:
    """Tokens per chunk so that the op's two fp32 ``[chunk, local_vocab]`` work buffers fit in
    ``budget_mb`` MiB (at least one token)."""
    if budget_mb < 1 or local_vocab < 1:
        raise ValueError(f"budget_mb and local_vocab must be >= 1, got {budget_mb}, "
                         f"{local_vocab}")
    return max(1, (budget_mb << 20) // (2 * 4 * local_vocab))


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy of the full next-token distribution
    ``softmax(logits / temperature)``, with the vocabulary sharded over ``tp_group``.

    Args:
        logits: ``[..., V/tp]`` this rank's vocabulary slice, fp32 or bf16. Never modified.
        labels: ``[...]`` global token ids (any integer dtype).
        tp_group: group the vocabulary is sharded over; the only group reduced over
            (two all_reduces per call). ``None``: not sharded.
        vocab_start: first global id of this slice; default ``rank(tp_group) * V/tp``.
        vocab_size: true vocabulary size; ids ``>= vocab_size`` are padding and get exactly
            zero probability. Default: ``world_size(tp_group) * V/tp`` (no padding).
        temperature: logits are divided by it first (> 0).
        chunk_size: tokens processed at a time in forward and backward; bounds the extra
            memory to a few fp32 ``[chunk_size, V/tp]`` buffers. ``None``: all at once.
        entropy_grad: make ``entropy`` differentiable too. Default ``False``: ERC uses
            entropy only as a mask, so it gets no graph and nothing is saved for it.

    Returns:
        ``(logp, entropy)``, both fp32 ``[...]`` shaped like ``labels``. ``logp`` is
        differentiable w.r.t. ``logits`` with the exact gradient
        ``(onehot(label) - softmax) / temperature``; a label outside ``[0, vocab_size)``
        gets ``logp = -inf``. Accumulation is fp32 for bf16 input.

    Memory: saves ``logits`` (by reference) plus two fp32 ``[T]`` vectors for backward,
    and recomputes the softmax chunk by chunk there; the gradient is the only full-size
    allocation.
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V_local] with V_local >= 1, got "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point (fp32 or bf16), got {logits.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without "
                         f"the vocabulary dim {tuple(logits.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    v_local = logits.shape[-1]
    rank, world = (0, 1) if tp_group is None else (dist.get_rank(tp_group),
                                                     dist.get_world_size(tp_group))
    if vocab_start is None:
        vocab_start = rank * v_local
    if vocab_size is None:
        vocab_size = world * v_local
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if vocab_size < 1 or vocab_size > world * v_local:
        raise ValueError(f"vocab_size must be in [1, tp_size * V_local = {world * v_local}] "
                         f"(pad the vocabulary to a multiple of tp_size), got {vocab_size}")
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    num_rows = labels.numel()
    chunk = max(num_rows, 1) if chunk_size is None else chunk_size

    return _VocabParallelLogprobEntropy.apply(
        logits, labels.long(), tp_group, vocab_start, n_valid, 1.0 / float(temperature), chunk,
        bool(entropy_grad))
