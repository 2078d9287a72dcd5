"""Triton kernels of the cuBLAS-hybrid LoRA path: the rank-r work, with cuBLAS doing the base GEMMs.

Notation as in ``fastpeft.kernels.lora.kernels``: x ``[M, K]``, W ``[N, K]``, A ``[R, K]``, B ``[N, R]``,
keep-mask ``D`` (Philox, drawn from the op's seed), ``x_hat = D * x / (1-p)``,
``s = x_hat A^T [M, R]``.

Forward   ``lora_hybrid_fwd_kernel`` writes ``y = bias + scaling * s B^T`` and ``s``; the launcher
          then runs ``y.addmm_(x, W^T)``: cuBLAS adds the base GEMM into y in its epilogue.
Backward  the fused path's passes over dY give ``dS = scaling * dY B`` and
          ``dB = scaling * dY^T s`` (``fastpeft.kernels.lora.launch.lora_backward``'s passes); ``lora_hybrid_dx_kernel``
          writes ``dX_lora = D * (dS A) / (1-p)`` and cuBLAS accumulates ``dY W`` onto it; the
          fused path's pass over x gives ``dA = dS^T x_hat`` (``fastpeft.kernels.lora.launch.lora_backward``).

Numerics as in the fused kernels: ``x_hat A^T`` with operands widened to fp32
(``shrink_tile.shrink_rows``), ``s B^T`` and ``dS A`` in the LoRA weights' dtype
(``tile_utils.rank_dot``: fp32 adapters keep the rank-r side in fp32 on tf32 tensor cores);
``s`` and ``dS`` are fp32. Dropout masks are drawn with ``philox_dropout.keep_mask`` at the
same (row, column) counters as every other kernel, so the mask equals the fused kernels' for
the same seed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.philox_dropout import keep_mask
from fastpeft.kernels.shrink_tile import shrink_rows
from fastpeft.kernels.tile_utils import rank_dot


# Arguments whose values are arbitrary (row count, rank, split, B's row stride = R, the
# dropout threshold) are exempt from Triton's launch-time specialization on divisibility by
# 16, as in fastpeft.kernels.lora.kernels: one compiled variant serves every value, the one `fastpeft check`
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
        x_ptr, a_ptr, seed_ptr, rows, row_ok, 0, K, K, R,
        stride_xm, stride_xk, stride_ar, stride_ak, threshold,
        HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R, True, PRECISION,  # fp32 operands (a bandwidth-bound pass)
    )
    if HAS_DROPOUT:
        s *= keep_scale
    if pid_n == 0:
        tl.store(s_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :], s,
                 mask=row_ok[:, None] & (offs_r[None, :] < R))
    s_scaled = s * scaling
    for n_tile in range(pid_n, tl.cdiv(N, BLOCK_N), split_n):
        cols = n_tile * BLOCK_N + offs_n
        col_ok = cols < N
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=(offs_r[:, None] < R) & col_ok[None, :], other=0.0)
        acc = rank_dot(s_scaled, b, None, b_ptr, UPCAST, PRECISION)
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
    ds = tl.load(ds_ptr + rows.to(tl.int64)[:, None] * R + offs_r[None, :],
                 mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & col_ok[None, :], other=0.0)
    acc = rank_dot(ds, a, None, a_ptr, UPCAST, PRECISION)
    if HAS_DROPOUT:
        acc = tl.where(keep_mask(tl.load(seed_ptr), rows, k0, K, threshold, BLOCK_M, BLOCK_K), acc * keep_scale, 0.0)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
