"""Log-probabilities and entropy over a vocabulary sharded across tensor-parallel ranks.

ERC needs two things from every forward pass: the log-prob of the sampled token (with an
exact gradient) and the entropy of the *whole* next-token distribution (only as a mask, so
by default without a graph). Both come from the same softmax statistics, so one pass over
the logits serves both.

Layout follows Megatron's ``vocab_parallel_cross_entropy``: collective-free local helpers
(``_local_*``) and one ``torch.autograd.Function`` that does the reductions over the group
it is given (``softmax_stats.combine_over_group``). Nothing reads Megatron's global
``parallel_state``.

Forward, one pass: each tile of this rank's logits is read once and folded into running
per-token statistics with the online-softmax rescaling (``u = z / temperature``)::

    m = max_v u_v,   s = sum_v exp(u_v - m),   a = sum_v exp(u_v - m) (u_v - m)

then the ranks' ``(m, s, a, z_label)`` are combined with an all_reduce MAX of ``[T]`` and
one all_reduce SUM of ``[4, T]``::

    logp = z_label / temperature - m - log s
    H    = log s - a / s                       (= -sum_v p_v log p_v)

Backward recomputes the softmax tile by tile from the saved logits (as given, no fp32
copy) and the per-token ``shift = m + log s``, and writes each gradient element once::

    dlogp/dz_v = (onehot_v(label) - p_v) / temperature
    dH/dz_v    = -p_v (log p_v + H) / temperature

Tiles: on CPU a few hundred KiB (the logits tile and its two fp32 work buffers stay in
cache, so every elementwise step after the first read is a cache hit); on GPUs
``chunk_size`` rows of the whole local vocabulary (few large kernels). The work buffers
never exceed two fp32 ``[chunk_size, V/tp]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_erc.ops.softmax_stats import combine_over_group, merge_into, vocab_shard

__all__ = ["logprobs_and_entropy", "chunk_rows"]

# CPU tiles: 128 Ki elements (512 KiB in fp32) and at most 32 Ki vocabulary columns. On
# 4096 x 16384 fp32 logits (one thread) the forward is 4-5x faster than whole-chunk passes,
# within noise from 64 Ki to 512 Ki elements; the smaller end keeps the two work buffers
# (what the op adds to the logits gradient in training) near 1 MiB.
_CPU_TILE_ELEMS = 1 << 17
_CPU_TILE_COLS = 1 << 15


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for bf16/fp16/fp32 input; float64 input (tests) stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_shape(device: torch.device, num_rows: int, n_valid: int, chunk: int
                ) -> tuple[int, int]:
    """``(rows, cols)`` of one tile of the ``[num_rows, n_valid]`` local logits."""
    cols = max(n_valid, 1)
    if device.type == "cpu":
        cols = min(cols, _CPU_TILE_COLS)
        return max(1, min(chunk, num_rows, _CPU_TILE_ELEMS // cols)), cols
    return max(1, min(chunk, num_rows)), cols


def _tiles(num: int, size: int):
    for start in range(0, num, size):
        yield start, min(start + size, num)


# ----------------------------------------------------------------------------------------
# Collective-free local helpers. ``x`` is always the 2-D view ``[T, V_local]`` restricted
# to the non-padding columns ``[:, :n_valid]``.
# ----------------------------------------------------------------------------------------


def _scaled_minus(x: torch.Tensor, neg_shift: torch.Tensor, inv_temp: float,
                  out: torch.Tensor) -> torch.Tensor:
    """``out = inv_temp * x + neg_shift[:, None]`` in one kernel (``x`` promoted to
    ``out``'s dtype element by element: no separate fp32 copy of ``x``)."""
    if inv_temp == 1.0:
        return torch.add(x, neg_shift.unsqueeze(-1), out=out)
    return torch.add(neg_shift.unsqueeze(-1), x, alpha=inv_temp, out=out)


def _local_stats(x: torch.Tensor, inv_temp: float, rows: int, cols: int,
                 acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This slice's ``(m, s, a)`` (``[T]`` each, ``acc_dtype``) in one read of ``x``.

    Tiles of ``rows x cols`` are read once each; within a tile the max, exp and both sums
    work on cached data; tiles of the same rows merge by online-softmax rescaling. An
    all-padding slice is the empty part ``(-inf, 0, 0)``.
    """
    num_rows, width = x.shape
    kw = {"dtype": acc_dtype, "device": x.device}
    m, s, a = (torch.empty(num_rows, **kw) for _ in range(3))
    if width == 0:
        m.fill_(float("-inf"))
        s.zero_()
        a.zero_()
        return m, s, a
    y_buf = torch.empty(rows * min(cols, width), **kw)
    e_buf = torch.empty_like(y_buf)
    for r0, r1 in _tiles(num_rows, rows):
        n = r1 - r0
        for c0, c1 in _tiles(width, cols):
            xt = x[r0:r1, c0:c1]
            y = y_buf[:n * (c1 - c0)].view(n, c1 - c0)
            e = e_buf[:n * (c1 - c0)].view(n, c1 - c0)
            first = c0 == 0
            m_t = xt.amax(dim=-1).to(acc_dtype).mul_(inv_temp)
            s_t = s[r0:r1] if first else torch.empty(n, **kw)
            a_t = a[r0:r1] if first else torch.empty(n, **kw)
            _scaled_minus(xt, m_t.neg(), inv_temp, out=y)
            torch.exp(y, out=e)
            torch.sum(e, dim=-1, out=s_t)
            torch.sum(e.mul_(y), dim=-1, out=a_t)  # in cache: faster than vecdot or bmm
            if first:
                m[r0:r1] = m_t
            else:
                merge_into(m[r0:r1], s[r0:r1], a[r0:r1], m_t, s_t, a_t)
    return m, s, a


def _local_target(x: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                  acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logit of each row's label where this slice owns it (else 0) and a 1/0 hit flag:
    ``[T, V], [T] -> [T], [T]``."""
    local = labels - vocab_start
    hit = (local >= 0) & (local < x.shape[-1])
    if x.shape[-1] == 0:
        return (torch.zeros(labels.shape, dtype=acc_dtype, device=x.device),
                hit.to(acc_dtype))
    picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return picked.to(acc_dtype).masked_fill_(~hit, 0.0), hit.to(acc_dtype)


def _local_grad_into(grad: torch.Tensor, x: torch.Tensor, local_labels: torch.Tensor,
                     shift: torch.Tensor, inv_temp: float, g_logp: torch.Tensor,
                     g_ent: torch.Tensor | None, entropy: torch.Tensor | None, rows: int,
                     cols: int) -> None:
    """Write the gradient w.r.t. ``x`` (``[T, V]``) into ``grad`` (same shape, the logits'
    dtype), tile by tile; each element of ``grad`` is written once (fp32 logits: computed
    in place; bf16: in an fp32 tile buffer, then rounded once).

    ``shift = m + log s`` so that ``inv_temp * x - shift = log p``. ``g_logp``, ``g_ent``,
    ``entropy``: ``[T]``. ``local_labels = labels - vocab_start``; rows whose label lives
    on another rank get no one-hot term.
    """
    num_rows, width = x.shape
    if width == 0:
        return
    acc_dtype = shift.dtype
    kw = {"dtype": acc_dtype, "device": x.device}
    direct = grad.dtype == acc_dtype
    neg_shift = shift.neg()
    onehot_val = g_logp * inv_temp
    if g_ent is None:
        p_scale = g_logp * -inv_temp  # grad = -p g_logp / T
    else:  # grad = -p (g_logp + g_ent (log p + H)) / T = p (k1 log p + k0)
        k1 = g_ent * -inv_temp
        k0 = torch.addcmul(g_logp, g_ent, entropy).mul_(-inv_temp)
        lp_buf = torch.empty(rows * min(cols, width), **kw)
    if not direct:
        out_buf = torch.empty(rows * min(cols, width), **kw)
    for c0, c1 in _tiles(width, cols):
        k = c1 - c0
        within = local_labels - c0
        hit = (within >= 0) & (within < k)
        idx = within.clamp_(0, k - 1).unsqueeze(-1)
        val = torch.where(hit, onehot_val, 0.0).unsqueeze(-1)
        for r0, r1 in _tiles(num_rows, rows):
            xt = x[r0:r1, c0:c1]
            dst = grad[r0:r1, c0:c1] if direct else out_buf[:(r1 - r0) * k].view(r1 - r0, k)
            if g_ent is None:
                _scaled_minus(xt, neg_shift[r0:r1], inv_temp, out=dst)
                dst.exp_().mul_(p_scale[r0:r1].unsqueeze(-1))
            else:
                lp = lp_buf[:(r1 - r0) * k].view(r1 - r0, k)
                _scaled_minus(xt, neg_shift[r0:r1], inv_temp, out=lp)
                torch.exp(lp, out=dst)
                lp.mul_(k1[r0:r1].unsqueeze(-1)).add_(k0[r0:r1].unsqueeze(-1))
                dst.mul_(lp)
            dst.scatter_add_(-1, idx[r0:r1], val[r0:r1])
            if not direct:
                grad[r0:r1, c0:c1].copy_(dst)


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
        acc_dtype = _acc_dtype(logits.dtype)
        rows, cols = _tile_shape(logits.device, x.shape[0], n_valid, chunk)

        m, s, a = _local_stats(x, inv_temp, rows, cols, acc_dtype)
        target, hits = _local_target(x, flat_labels, vocab_start, acc_dtype)
        logp, entropy, shift = combine_over_group(m, s, a, target, hits, inv_temp, group)

        ctx.meta = (vocab_start, n_valid, inv_temp, chunk, entropy_grad)
        logp = logp.view(labels.shape)
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
        acc_dtype = _acc_dtype(logits.dtype)
        g_logp = grad_logp.reshape(-1).to(acc_dtype)
        g_ent = grad_entropy.reshape(-1).to(acc_dtype) if entropy_grad else None
        num_rows = x.shape[0]
        rows, cols = _tile_shape(logits.device, num_rows, n_valid, chunk)

        grad = torch.empty((num_rows, v_local), dtype=logits.dtype, device=logits.device)
        grad[:, n_valid:].zero_()  # padding ids have zero probability: zero gradient
        _local_grad_into(grad[:, :n_valid], x, labels.reshape(-1) - vocab_start, shift,
                         inv_temp, g_logp, g_ent, entropy, rows, cols)
        return grad.view(logits.shape), None, None, None, None, None, None, None


def chunk_rows(budget_mb: int, local_vocab: int) -> int:
    """Tokens per chunk so that the op's two fp32 ``[chunk, local_vocab]`` work buffers fit in
    ``budget_mb`` MiB (at least one token). An upper bound: CPU tiles are smaller still."""
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
        chunk_size: at most this many tokens per tile in forward and backward; bounds the
            work buffers to two fp32 ``[chunk_size, V/tp]``. ``None``: no bound (CPU tiles
            are cache-sized either way; GPUs then take all tokens at once).
        entropy_grad: make ``entropy`` differentiable too. Default ``False``: ERC uses
            entropy only as a mask, so it gets no graph and nothing is saved for it.

    Returns:
        ``(logp, entropy)``, both fp32 ``[...]`` shaped like ``labels``. ``logp`` is
        differentiable w.r.t. ``logits`` with the exact gradient
        ``(onehot(label) - softmax) / temperature``; a label outside ``[0, vocab_size)``
        gets ``logp = -inf``. Accumulation is fp32 for bf16 input.

    Memory: saves ``logits`` (by reference) plus one fp32 ``[T]`` vector (two with
    ``entropy_grad``) for backward, and recomputes the softmax tile by tile there; the
    gradient is the only full-size allocation. Reads: the logits once in forward, once in
    backward; writes: the gradient once.
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

    vocab_start, n_valid = vocab_shard(logits.shape[-1], tp_group, vocab_start, vocab_size)
    num_rows = labels.numel()
    chunk = max(num_rows, 1) if chunk_size is None else chunk_size

    return _VocabParallelLogprobEntropy.apply(
        logits, labels.long(), tp_group, vocab_start, n_valid, 1.0 / float(temperature), chunk,
        bool(entropy_grad))
