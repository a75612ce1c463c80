"""Triton kernels of ``fused_linear``: the output layer's logits ``z = h W^T`` are formed one
``[BT, BV]`` tile at a time in registers and consumed there; ``[T, V/tp]`` never exists.

Imported only through ``fused_linear._kernels()``: importing Triton is optional, and
``TRITON_INTERPRET=1`` must be set before this module is imported for the interpreter to
run the kernels on CPU tensors (CI does that; see ``tests/unit/test_fused_linear.py``).

- ``_stats_kernel``: grid ``(token blocks, vocabulary splits)``; each program folds its
  split's tiles into online-softmax statistics ``(m, s, a)`` plus the label's raw logit
  (see ``softmax_stats``), written per split and merged by the caller.
- ``_dlogits_kernel``: grid ``(token blocks, vocabulary blocks of one chunk)``; recomputes a
  logits tile and writes ``dL/dz`` for it into a ``[T, chunk]`` buffer that two GEMMs turn
  into the hidden and weight gradients.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton 3.9's interpreter multiplies bf16 operands of tl.dot as raw uint16 bits; the kernels
# then upcast operands to fp32 first, which is the same arithmetic (bf16 x bf16 products are
# exact in fp32 and tensor cores accumulate in fp32), only in another order.
UPCAST = INTERPRET
# Small tiles for the interpreter (it costs per program and per op, not per element).
BT, BV, BH = (16, 16, 16) if INTERPRET else (64, 128, 64)
SPLIT_V = 32 if INTERPRET else 4096  # vocabulary columns per forward program
NUM_WARPS = 8


# Only core builtins inside the kernels, plus these: ``tl.sum``, ``tl.max`` and ``tl.zeros``
# are themselves ``@triton.jit`` functions of triton.language.standard, which the interpreter
# cannot call when Triton was imported before ``TRITON_INTERPRET=1`` was set (megatron-core
# imports Triton); ``tl.reduce`` with our own combine functions is what they expand to.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                 BT_: tl.constexpr, BV_: tl.constexpr, BH_: tl.constexpr,
                 UPCAST_: tl.constexpr, IEEE: tl.constexpr):
    """``h[rows] @ w[cols]^T`` as an fp32 ``[BT, BV]`` tile (masked rows/cols are 0)."""
    acc = tl.full((BT_, BV_), 0.0, dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h  # V/tp x H can pass 2**31
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, H, BH_):
        ks = k0 + tl.arange(0, BH_)
        k_ok = ks < H
        hb = tl.load(h_rows + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_rows + ks[None, :],
                     mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST_:
            hb = hb.to(tl.float32)
            wb = wb.to(tl.float32)
        if IEEE:
            acc = tl.dot(hb, tl.trans(wb), acc, input_precision="ieee")
        else:
            acc = tl.dot(hb, tl.trans(wb), acc)
    return acc


@triton.jit
def _stats_kernel(h_ptr, w_ptr, lab_ptr, out_ptr, T, H, n_valid, stride_h, stride_w,
                  inv_temp, split_v,
                  BT_: tl.constexpr, BV_: tl.constexpr, BH_: tl.constexpr,
                  UPCAST_: tl.constexpr, IEEE: tl.constexpr):
    """``out[0..3, split, rows] = (m, s, a, z_label)`` over this split's columns."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BT_ + tl.arange(0, BT_)
    row_ok = rows < T
    lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BT_,), float("-inf"), dtype=tl.float32)
    s = tl.full((BT_,), 0.0, dtype=tl.float32)
    a = tl.full((BT_,), 0.0, dtype=tl.float32)
    tgt = tl.full((BT_,), 0.0, dtype=tl.float32)
    v_lo = pid_s * split_v
    v_hi = tl.minimum(v_lo + split_v, n_valid)
    for v0 in range(v_lo, v_hi, BV_):
        cols = v0 + tl.arange(0, BV_)
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                         BT_, BV_, BH_, UPCAST_, IEEE)
        tgt += tl.reduce(tl.where(cols[None, :] == lab[:, None], z, 0.0), 1, _add)
        u = z * inv_temp
        # m_new is finite: every tile holds a real column. Masked columns get y = 0, e = 0
        # (no inf * 0 anywhere).
        m_new = tl.maximum(m, tl.reduce(tl.where(col_ok[None, :], u, float("-inf")), 1, _max))
        y = tl.where(col_ok[None, :], u - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(y), 0.0)
        d = tl.where(m > float("-inf"), m - m_new, 0.0)  # s = 0 on the first tile anyway
        c = tl.exp(m - m_new)
        a = c * (a + d * s) + tl.reduce(e * y, 1, _add)
        s = c * s + tl.reduce(e, 1, _add)
        m = m_new
    n_split = tl.num_programs(1)
    base = out_ptr + pid_s * T + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + n_split * T, s, mask=row_ok)
    tl.store(base + 2 * n_split * T, a, mask=row_ok)
    tl.store(base + 3 * n_split * T, tgt, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, lab_ptr, coef_ptr, dz_ptr, T, H, c0, width, stride_h,
                    stride_w, inv_temp,
                    BT_: tl.constexpr, BV_: tl.constexpr, BH_: tl.constexpr,
                    UPCAST_: tl.constexpr, IEEE: tl.constexpr):
    """``dz[rows, j] = p (k1 log p + k0) + [label == c0 + j] g`` for columns
    ``c0 + j``, ``j < width``; ``coef = [shift, k1, k0, g]`` ``[4, T]`` fp32."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_t * BT_ + tl.arange(0, BT_)
    row_ok = rows < T
    rel = pid_v * BV_ + tl.arange(0, BV_)
    col_ok = rel < width
    cols = c0 + rel
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                     BT_, BV_, BH_, UPCAST_, IEEE)
    lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    shift = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    k1 = tl.load(coef_ptr + T + rows, mask=row_ok, other=0.0)
    k0 = tl.load(coef_ptr + 2 * T + rows, mask=row_ok, other=0.0)
    g = tl.load(coef_ptr + 3 * T + rows, mask=row_ok, other=0.0)
    logp = z * inv_temp - shift[:, None]
    dz = tl.exp(logp) * (k1[:, None] * logp + k0[:, None])
    dz += tl.where(cols[None, :] == lab[:, None], g[:, None], 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * width + rel[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=ok)


def _flags(h: torch.Tensor) -> dict:
    return {"BT_": BT, "BV_": BV, "BH_": BH, "UPCAST_": UPCAST,
            "IEEE": h.dtype == torch.float32}


def local_stats(h: torch.Tensor, w: torch.Tensor, local_labels: torch.Tensor, n_valid: int,
                inv_temp: float) -> torch.Tensor:
    """Per-split statistics ``[4, n_split, T]`` fp32 (``m, s, a, z_label``) of the logits
    ``h[T, H] @ w[:n_valid, H]^T`` (``n_valid >= 1``)."""
    num_rows, hidden = h.shape
    n_split = triton.cdiv(n_valid, SPLIT_V)
    out = torch.empty(4, n_split, num_rows, dtype=torch.float32, device=h.device)
    grid = (triton.cdiv(num_rows, BT), n_split)
    _stats_kernel[grid](h, w, local_labels, out, num_rows, hidden, n_valid, h.stride(0),
                        w.stride(0), inv_temp, SPLIT_V, num_warps=NUM_WARPS, **_flags(h))
    return out


def dlogits(h: torch.Tensor, w: torch.Tensor, local_labels: torch.Tensor,
            coef: torch.Tensor, c0: int, out: torch.Tensor, inv_temp: float) -> None:
    """Fill ``out [T, width]`` (contiguous) with ``dL/dz`` of vocabulary columns
    ``c0 .. c0 + width`` (all real, not padding)."""
    num_rows, hidden = h.shape
    width = out.shape[1]
    grid = (triton.cdiv(num_rows, BT), triton.cdiv(width, BV))
    _dlogits_kernel[grid](h, w, local_labels, coef, out, num_rows, hidden, c0, width,
                          h.stride(0), w.stride(0), inv_temp, num_warps=NUM_WARPS,
                          **_flags(h))
