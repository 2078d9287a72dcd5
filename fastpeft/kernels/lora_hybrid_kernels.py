"""Triton kernels of the cuBLAS-hybrid LoRA path: the rank-r work, with cuBLAS doing the base GEMMs.

Notation as in ``lora_kernels.py``: x ``[M, K]``, W ``[N, K]``, A ``[R, K]``, B ``[N, R]``,
keep-mask ``D`` (Philox, drawn from the op's seed), ``x_hat = D * x / (1-p)``,
``s = x_hat A^T [M, R]``.

Forward   ``lora_hybrid_fwd_kernel`` writes ``y = bias + scaling * s B^T`` and ``s``; the launcher
          then runs ``y.addmm_(x, W^T)``: cuBLAS adds the base GEMM into y in its epilogue.
Backward  ``lora_bwd_dy_kernel`` (shared with the fused path) gives ``dS = scaling * dY B`` and
          ``dB`` from one pass over dY; ``lora_hybrid_dx_kernel`` writes
          ``dX_lora = D * (dS A) / (1-p)`` and cuBLAS accumulates ``dY W`` onto it;
          ``lora_bwd_da_kernel`` (shared) gives ``dA = dS^T x_hat`` from one pass over x.

The rank-r dots (``x_hat A^T``, ``s B^T``, ``dS A``) take their operands in the LoRA weights'
dtype, as PEFT runs the LoRA branch in the adapter's dtype: fp32 adapters on a 16-bit model
keep the rank-r side in fp32 (tf32 tensor cores, fp32 accumulation; x is widened exactly),
16-bit adapters use their own tensor-core path. ``s`` and ``dS`` are fp32. Dropout masks are
drawn with ``philox_dropout.keep_mask`` at the same (row, column) counters as every other
kernel, so the mask equals the fused kernels' for the same seed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.lora_kernels import _ds_tile
from fastpeft.kernels.philox_dropout import keep_mask
from fastpeft.kernels.tile_utils import to_compute


@triton.jit
def shrink_rows(
    x_ptr, a_ptr, seed_ptr, rows, row_ok, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, threshold,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``sum_k D[m, k] x[m, k] A[:, k]`` over all of K for the ``BLOCK_M`` rows ``rows``: fp32
    ``[BLOCK_M, BLOCK_R]``, zero for rows where ``row_ok`` is false and past R, without the
    ``1/(1-p)`` scale (masking is exact in any dtype; the caller scales the fp32 sum).

    The dot runs in A's dtype (``to_compute`` with A as the dtype reference).
    """
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = to_compute(tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0), a_ptr, UPCAST)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K), x, 0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        acc = tl.dot(x, to_compute(a, a_ptr, UPCAST), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return acc


# Arguments whose values are arbitrary (row count, rank, split, B's row stride = R, the
# dropout threshold) are exempt from Triton's launch-time specialization on divisibility by
# 16, as in lora_kernels.py: one compiled variant serves every value, the one `fastpeft check`
# compiles.
@triton.jit(do_not_specialize=("M", "R", "split_n", "stride_bn", "threshold"))
def lora_hybrid_fwd_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, seed_ptr, s_ptr, y_ptr,
    M, N, K, R, split_n,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling, threshold, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``y [M, N] = bias + scaling * s B^T`` (x's dtype) and ``s [M, R]`` (fp32), for cuBLAS to
    add ``x W^T`` onto y afterwards.

    1-D grid of ``cdiv(M, BLOCK_M) * split_n`` programs: program ``(i, j)`` computes ``s`` for
    row tile ``i`` over the whole K loop, then writes column tiles ``j, j + split_n, ...`` of y;
    the programs with ``j == 0`` store ``s``. The ``split_n`` programs of a row tile have
    consecutive ids, so they run together and all but the first read that tile of x (and A)
    from L2.
    """
    pid = tl.program_id(0)
    pid_m = pid // split_n
    pid_n = pid % split_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    s = shrink_rows(
        x_ptr, a_ptr, seed_ptr, rows, row_ok, K, R,
        stride_xm, stride_xk, stride_ar, stride_ak, threshold,
        HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R, UPCAST, PRECISION,
    )
    if HAS_DROPOUT:
        s *= keep_scale
    if pid_n == 0:
        tl.store(s_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :], s,
                 mask=row_ok[:, None] & (offs_r[None, :] < R))
    s_scaled = to_compute(s * scaling, a_ptr, UPCAST)
    for n_tile in range(pid_n, tl.cdiv(N, BLOCK_N), split_n):
        cols = n_tile * BLOCK_N + offs_n
        col_ok = cols < N
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=(offs_r[:, None] < R) & col_ok[None, :], other=0.0)
        acc = tl.dot(s_scaled, to_compute(b, a_ptr, UPCAST), input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=("M", "R", "threshold"))
def lora_hybrid_dx_kernel(
    ds_ptr, a_ptr, seed_ptr, dx_ptr,
    M, K, R,
    stride_ar, stride_ak,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dX_lora [M, K] = D * (dS A) / (1-p)`` in dX's dtype, for cuBLAS to add ``dY W`` onto.

    Grid ``(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))``, one tile per program (the reduction is over
    R, one dot). ``dS`` is the fp32 ``[M, R]`` of the pass over dY, already scaled.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < K
    ds = _ds_tile(ds_ptr, rows, row_ok, offs_r, R, a_ptr, UPCAST)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & col_ok[None, :], other=0.0)
    acc = tl.dot(ds, to_compute(a, a_ptr, UPCAST), input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = tl.where(keep_mask(tl.load(seed_ptr), rows, k0, K, threshold, BLOCK_M, BLOCK_K), acc * keep_scale, 0.0)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
