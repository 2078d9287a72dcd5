"""The fused QLoRA decode kernel: the base product on a quantized weight, dequantized in
registers, plus the LoRA term, in one launch that reads the packed weight once.

For x ``[M, K]`` (M <= ``configs.DECODE_BLOCK_M``, in the compute dtype), the quantized
``W [N, K]`` (``ref``'s layout: bitsandbytes' 4-bit codes with their block scales, double
quantization included, or its int8 rows with their row scales), an optional bias ``[N]`` in the
compute dtype, the rank side ``s' = scaling * dropout(x) A^T`` ``[M, r]`` in B's dtype (formed by
the caller: ``M x r``, a few hundred bytes) and ``B [N, r]``:

    y = ( round_c(x W_c^T + b) + s' B^T ) -> y's dtype,    W_c = round_c(dequant(W))

``round_c`` rounds to the compute dtype: ``W_c`` is exactly the weight ``ref.dequantize`` returns
(the same fp32 products, FP fusion off), the base term is rounded once as ``F.linear`` in the
compute dtype rounds it, and the LoRA term is added in fp32 before the one rounding to y's dtype
(``add_lora_product``'s single rounding). Only the order of the fp32 sums differs from the torch
path.

Each program owns ``BLOCK_N`` output columns for all M rows and walks K in ``BLOCK_K`` steps:
it loads the ``BLOCK_N x BLOCK_K`` codes of W (4-bit: one byte per two elements, each byte read
by the two lanes that need it, in the same memory transaction), looks them up in the 16-entry
code table (L1-resident), scales them by their block's scale (the nested scale computed per
element from cached loads), and multiplies with x's tile on the tensor cores (M padded to 16,
the smallest ``tl.dot``). The epilogue adds the bias, rounds, adds the rank-r product from
``s'`` and ``B``'s tile, and stores. Bytes from memory: the packed weight (N K / 2 for 4-bit, N K
for int8), the scales, and x / B / y (small at decode): ~3.5x fewer than a bf16 ``F.linear``
reads (estimate; no GPU has run this kernel -- opt-in, ``FASTPEFT_BACKEND=triton``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpeft.kernels.quant.kernels import block_scale
from fastpeft.kernels.tile_utils import rank_dot, to_compute


@triton.jit
def weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, cols, N, K,
                blocksize, nested_blocksize, INT8: tl.constexpr, NESTED: tl.constexpr):
    """``W[rows, cols]`` in fp32 before its rounding to the compute dtype (0 outside ``N x K``):
    int8 ``CB * scale[row]`` (``absmax_ptr`` holds ``SCB / 127``), or 4-bit ``code[nibble] *
    scale[block]`` with the element's nibble of the row-major packed codes (high nibble first)."""
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    flat = rows[:, None] * K + cols[None, :]
    if INT8:
        cb = tl.load(packed_ptr + flat, mask=inside, other=0).to(tl.float32)
        return cb * tl.load(absmax_ptr + rows, mask=rows < N, other=0.0)[:, None]
    else:
        byte = tl.load(packed_ptr + flat // 2, mask=inside, other=0).to(tl.int32)
        nibble = (byte >> (4 - 4 * (flat % 2))) & 15
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, flat // blocksize, inside,
                            nested_blocksize, NESTED)
        return tl.load(code_ptr + nibble, mask=inside, other=0.0) * scale


@triton.jit(do_not_specialize=["M", "R", "blocksize", "nested_blocksize", "stride_sm", "stride_bn"])
def qlora_decode_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                        bias_ptr, s_ptr, b_ptr, y_ptr,
                        M, N, K, R, blocksize, nested_blocksize, stride_xm, stride_sm, stride_bn, stride_ym,
                        INT8: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                     other=0.0)
        w = weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, cols, ks,
                        N, K, blocksize, nested_blocksize, INT8, NESTED).to(x_ptr.dtype.element_ty)
        acc = tl.dot(to_compute(xt, x_ptr, UPCAST), tl.trans(to_compute(w, x_ptr, UPCAST)), acc,
                     input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    base = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # F.linear's one rounding in the compute dtype
    ranks = tl.arange(0, BLOCK_R)
    s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                other=0.0)
    b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :], mask=(cols[:, None] < N) & (ranks[None, :] < R),
                other=0.0)
    y = rank_dot(s, tl.trans(b), base, b_ptr, UPCAST, PRECISION)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
