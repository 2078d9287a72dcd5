"""The shrink loop ``x_hat A^T`` over a range of K for one tile of rows, as a ``@triton.jit``
helper: the hybrid forward kernel computes ``s`` with it (``lora_hybrid_kernels``), and a
split shrink kernel can compute its partials with it."""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.philox_dropout import keep_mask
from fastpeft.kernels.tile_utils import to_compute


@triton.jit
def shrink_rows(
    x_ptr, a_ptr, seed_ptr, rows, row_ok, k_start, k_end, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, threshold,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``sum over k in [k_start, k_end) of D[m, k] x[m, k] A[:, k]`` for the ``BLOCK_M`` rows
    ``rows`` of x ``[M, K]`` and A ``[R, K]``: fp32 ``[BLOCK_M, BLOCK_R]``, zero where
    ``row_ok`` is false and past R, without the dropout's ``1/(1-p)`` (masking is exact; the
    caller scales the fp32 sum).

    The mask ``D`` is ``philox_dropout.keep_mask`` at columns ``k0 .. k0 + BLOCK_K``, the
    counters every kernel uses (``k_start`` must be a multiple of 4). Operands meet in A's
    dtype (``tile_utils.to_compute``), or widened to fp32 with ``UPCAST``: either way every
    product is exact in the fp32 accumulator for 16-bit x and A (bf16 x bf16 on the bf16 tensor
    cores; x widened to meet fp32 A on the tf32 ones).
    """
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + (k_start + offs_k)[:, None] * stride_ak
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        x = to_compute(tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0), a_ptr, UPCAST)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K), x, 0.0)
        a = to_compute(tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0), a_ptr, UPCAST)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return acc
