"""Triton kernels of the fused LoRA linear op (forward and backward).

Notation: x ``[M, K]``, W ``[N, K]``, A ``[R, K]``, B ``[N, R]``, dropout keep-mask ``D``
with kept values scaled by ``1/(1-p)``, ``x_hat = D * x / (1-p)``, ``s = x_hat A^T [M, R]``.

Forward   ``y = x W^T + bias + scaling * s B^T``
Backward  ``dS = scaling * dY B``, ``dB = scaling * dY^T s``, ``dA = dS^T x_hat``,
          ``dX = dY W + D * (dS A) / (1-p)``

Kernels (the launchers in ``lora_launch.py`` choose among them):
- ``lora_shrink_kernel``: ``s`` partial sums over a K-split, dropout applied on the fly
  (mask drawn once per element). Used when dropout is on or re-computing ``s`` per output
  tile would cost more than one extra pass over x.
- ``lora_fwd_kernel``: the base GEMM with the LoRA term in its epilogue; with
  ``FUSE_SHRINK`` it also computes ``s`` inside its K-loop from the x tiles it already has
  (x read once); otherwise it sums the shrink kernel's partials. The programs of the first
  column tile write ``s`` (fp32) for the backward.
- ``lora_bwd_dy_kernel``: one pass over dY giving ``dS`` and ``dB``.
- ``lora_bwd_dx_kernel``: ``dX = dY W`` with the LoRA term and dropout in its epilogue.
- ``lora_bwd_da_kernel``: ``dA`` from one pass over x, the mask regenerated. (Fusing it
  into the dX epilogue kept the x tile, the mask and two accumulators live at once:
  register spills on every tile worth using.)

``lora_fwd_kernel`` and ``lora_bwd_dx_kernel`` share the GEMM main loop (``_gemm_mainloop``):
the backward runs it on ``W`` with its strides swapped (reduction over N instead of K).
Rows past M are handled by wrapping row indices (loads stay in bounds, stores are masked)
wherever duplicated rows cannot leak into a reduction over M; the reductions over M mask
them to zero instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.philox_dropout import keep_mask
from fastpeft.kernels.tile_utils import output_tile, to_compute


@triton.jit
def _gemm_mainloop(
    p_ptr, q_ptr, a_ptr, offs_m, offs_n, RED,
    stride_pm, stride_pr, stride_qn, stride_qr, stride_ar, stride_ak,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    R, FUSE_SHRINK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``acc = P Q^T`` for rows ``offs_m`` of P ``[*, RED]`` and rows ``offs_n`` of Q ``[*, RED]``.

    With ``FUSE_SHRINK`` it also returns ``s_acc = P A^T`` (A ``[R, RED]``) from the same P
    tiles; otherwise ``s_acc`` is a zero placeholder.
    """
    offs_red = tl.arange(0, BLOCK_RED)
    offs_r = tl.arange(0, BLOCK_R)
    p_ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_red[None, :] * stride_pr
    q_ptrs = q_ptr + offs_n.to(tl.int64)[None, :] * stride_qn + offs_red[:, None] * stride_qr
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_red[:, None] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for red0 in range(0, RED, BLOCK_RED):
        red_ok = offs_red < RED - red0
        p = to_compute(tl.load(p_ptrs, mask=red_ok[None, :], other=0.0), p_ptr, UPCAST)
        q = to_compute(tl.load(q_ptrs, mask=red_ok[:, None], other=0.0), p_ptr, UPCAST)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
        if FUSE_SHRINK:
            a_ok = red_ok[:, None] & (offs_r[None, :] < R)
            a = to_compute(tl.load(a_ptrs, mask=a_ok, other=0.0), p_ptr, UPCAST)
            s_acc = tl.dot(p, a, s_acc, input_precision=PRECISION)
            a_ptrs += BLOCK_RED * stride_ak
        p_ptrs += BLOCK_RED * stride_pr
        q_ptrs += BLOCK_RED * stride_qr
    return acc, s_acc


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, part_ptr, seed_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``part[split, m, :] = sum over this split's K range of x_hat[m, k] A[:, k]``.

    Grid ``(cdiv(M, BLOCK_M), splits)``; part is fp32 ``[splits, M, BLOCK_R]`` and the
    consumer sums the splits in a fixed order (deterministic, no atomics).
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + (k_start + offs_k)[:, None] * stride_ak
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = to_compute(x, x_ptr, UPCAST)
        if HAS_DROPOUT:
            # Masking is exact in any dtype; the 1/(1-p) scale is applied to the fp32 sum.
            x = tl.where(keep_mask(seed, offs_m, k0, K, threshold, BLOCK_M, BLOCK_K), x, 0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        s_acc = tl.dot(x, to_compute(a, x_ptr, UPCAST), s_acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        s_acc *= keep_scale
    part_ptrs = part_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(part_ptrs, s_acc, mask=m_ok[:, None])


@triton.jit
def lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, part_ptr, s_ptr, y_ptr,
    M, N, K, R, num_parts,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``y[M, N] = x W^T + bias + scaling * s B^T``; also writes ``s [M, R]`` (fp32).

    Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``. Without ``FUSE_SHRINK``, ``s`` is the
    sum of ``num_parts`` shrink partials ``part [num_parts, M, BLOCK_R]``.
    """
    rows, cols, pid_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N
    acc, s_acc = _gemm_mainloop(
        x_ptr, w_ptr, a_ptr, rows % M, cols % N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
        BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, R, FUSE_SHRINK, UPCAST, PRECISION,
    )
    if not FUSE_SHRINK:
        part_ptrs = part_ptr + (rows % M).to(tl.int64)[:, None] * BLOCK_R + offs_r[None, :]
        for _ in range(num_parts):
            s_acc += tl.load(part_ptrs)
            part_ptrs += M * BLOCK_R
    if pid_n == 0:
        s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :]
        tl.store(s_ptrs, s_acc, mask=row_ok[:, None] & (offs_r[None, :] < R))
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + (cols % N)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=offs_r[:, None] < R, other=0.0)
    acc = tl.dot(to_compute(s_acc * scaling, x_ptr, UPCAST), to_compute(b, x_ptr, UPCAST), acc,
                 input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def lora_bwd_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    M, N, R, split_n,
    stride_dym, stride_dyn, stride_bn, stride_br,
    scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One pass over dY: ``dS += scaling * dY B`` and ``dB += scaling * dY^T s``.

    Grid ``(cdiv(M, BLOCK_M), split_n)``: program (i, j) takes row-tile i and column tiles
    j, j + split_n, ... of dY. ``dS [M, R]`` and ``dB [N, R]`` are zeroed fp32 buffers
    accumulated with atomics (dS needs none when split_n is 1).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    r_ok = offs_r < R
    s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :],
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    s = to_compute(s * scaling, dy_ptr, UPCAST)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n_tile in range(pid_s, tl.cdiv(N, BLOCK_N), split_n):
        cols = n_tile * BLOCK_N + offs_n
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dy = to_compute(dy, dy_ptr, UPCAST)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        ds_acc = tl.dot(dy, to_compute(b, dy_ptr, UPCAST), ds_acc, input_precision=PRECISION)
        db_part = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
        tl.atomic_add(db_ptr + cols[:, None] * R + offs_r[None, :], db_part,
                      mask=col_ok[:, None] & r_ok[None, :])
    ds_ptrs = ds_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :]
    ds_ok = row_ok[:, None] & r_ok[None, :]
    if split_n == 1:
        tl.store(ds_ptrs, ds_acc * scaling, mask=ds_ok)
    else:
        tl.atomic_add(ds_ptrs, ds_acc * scaling, mask=ds_ok)


@triton.jit
def _ds_tile(ds_ptr, rows, row_ok, offs_r, R, dtype_ref_ptr, UPCAST: tl.constexpr):
    """Rows ``rows`` of the fp32 ``dS [M, R]`` (zero past M and R), in the compute dtype."""
    ds = tl.load(ds_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :],
                 mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    return to_compute(ds, dtype_ref_ptr, UPCAST)


@triton.jit
def lora_bwd_dx_kernel(
    dy_ptr, w_ptr, a_ptr, ds_ptr, seed_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dX[M, K] = dY W + D * (dS A) / (1-p)``: one GEMM with the LoRA term in its epilogue.

    Grid ``(cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),)``. ``dS`` is fp32 ``[M, R]``, already
    scaled. Without dropout the LoRA product accumulates straight into the GEMM's tile.
    """
    rows, cols, pid_k = output_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < K
    # dY W: P = dY [M, N], Q = W^T viewed as [K, N] (W's strides swapped).
    acc, _ = _gemm_mainloop(
        dy_ptr, w_ptr, a_ptr, rows % M, cols % K, N,
        stride_dym, stride_dyn, stride_wk, stride_wn, stride_ar, stride_ak,
        BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, R, False, UPCAST, PRECISION,
    )
    # The epilogue tiles (the mask's Philox state above all) are made after the main loop,
    # so none of them is live across it.
    ds = _ds_tile(ds_ptr, rows, row_ok, offs_r, R, dy_ptr, UPCAST)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & col_ok[None, :], other=0.0)
    a = to_compute(a, dy_ptr, UPCAST)
    if HAS_DROPOUT:
        keep = keep_mask(tl.load(seed_ptr), rows, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
        acc += tl.where(keep, tl.dot(ds, a, input_precision=PRECISION) * keep_scale, 0.0)
    else:
        acc = tl.dot(ds, a, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def lora_bwd_da_kernel(
    x_ptr, ds_ptr, seed_ptr, da_ptr,
    M, K, R,
    stride_xm, stride_xk,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dA [R, K] += dS^T x_hat`` over one ``BLOCK_M x BLOCK_K`` tile of x.

    Grid ``(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))``; ``dA`` is a zeroed fp32 buffer
    accumulated with atomics. The dropout mask is regenerated from the seed.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < K
    ds = _ds_tile(ds_ptr, rows, row_ok, offs_r, R, x_ptr, UPCAST)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    x = to_compute(x, x_ptr, UPCAST)
    if HAS_DROPOUT:
        # Exact masking; the 1/(1-p) scale goes on the fp32 product.
        x = tl.where(keep_mask(tl.load(seed_ptr), rows, k0, K, threshold, BLOCK_M, BLOCK_K), x, 0.0)
    da_part = tl.dot(tl.trans(ds), x, input_precision=PRECISION)
    if HAS_DROPOUT:
        da_part *= keep_scale
    tl.atomic_add(da_ptr + offs_r[:, None] * K + cols[None, :], da_part,
                  mask=(offs_r[:, None] < R) & col_ok[None, :])
