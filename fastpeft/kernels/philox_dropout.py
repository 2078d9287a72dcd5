"""Triton side of fastpeft's counter-based dropout (the scheme is described in
``fastpeft.kernels.dropout_mask``, whose ``keep_mask_philox`` draws the same bits in torch)."""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.dropout_mask import PHILOX_ROUNDS

# Globals read inside @triton.jit functions must be constexpr.
_N_ROUNDS = tl.constexpr(PHILOX_ROUNDS)

@triton.jit
def keep_mask(seed, offs_m, k0, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask ``[BLOCK_M, BLOCK_K]`` for rows ``offs_m`` and columns ``k0 .. k0+BLOCK_K``.

    ``k0`` must be a multiple of 4 (every tile width in fastpeft is).
    """
    k4 = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    counter = offs_m.to(tl.int64)[:, None] * ((K + 3) // 4) + k4[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter, _N_ROUNDS)
    # join(join(r0, r2), join(r1, r3)) has [..., a, b] = r_{2a+b}; flattening the last two
    # dims therefore lays lane l of counter c at column 4c + l.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))
    return (bits >> 1).to(tl.int32) >= threshold


@triton.jit
def keep_mask_kernel(seed_ptr, out_ptr, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes ``keep_mask`` for a whole ``[M, K]`` grid as int8 (0/1): what the op's kernels draw.

    Grid ``(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))``. Tests compare it with ``keep_mask_philox``
    and use it to rebuild the exact dropout of a forward.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = keep_mask(tl.load(seed_ptr), offs_m, k0, K, threshold, BLOCK_M, BLOCK_K)
    ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=ok)
