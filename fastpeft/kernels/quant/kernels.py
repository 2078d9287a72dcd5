"""Triton dequantization of bitsandbytes' quantized weights, in one launch (double quantization
included): what ``ref`` computes, bit for bit (the launches disable FP fusion, so the nested
scales' ``code * absmax + offset`` is a product then a sum, as in torch).

``dequant_4bit_kernel``: each program reads ``BLOCK`` bytes of packed codes (two per byte, the
high nibble first), looks up their 16-entry code table, scales by their block's scale (the
double-quantized one: ``nested_code[absmax_u8] * nested_absmax[block / nested_blocksize] +
offset``) in fp32, and writes ``2 BLOCK`` outputs in the output's dtype.
``dequant_int8_kernel``: ``cb * scale[row]`` in fp32, then rounded (the launcher forms ``scale =
scb * (1/127)`` with torch, as bitsandbytes does).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, inside, nested_blocksize,
                NESTED: tl.constexpr):
    """The fp32 scale of each element's ``block`` (``ref.blockwise_scales``): ``absmax[block]``,
    or with double quantization ``nested_code[absmax_u8[block]] * nested_absmax[block /
    nested_blocksize] + offset`` (a product then a sum: launched with FP fusion off)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        return tl.load(nested_code_ptr + q, mask=inside, other=0.0) * tl.load(
            nested_absmax_ptr + block // nested_blocksize, mask=inside, other=0.0) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=inside, other=0.0)


# Sizes are exempt from launch-time specialization (any weight shape and block size runs the
# one compiled variant, ``fastpeft check``'s; without double quantization nested_blocksize is 1).
@triton.jit(do_not_specialize=["n_bytes", "blocksize", "nested_blocksize"])
def dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
                        n_bytes, blocksize, nested_blocksize, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inside = i < n_bytes
    byte = tl.load(packed_ptr + i, mask=inside, other=0).to(tl.int32)
    block = (2 * i) // blocksize  # both elements of a byte share a block: block sizes are even
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, inside, nested_blocksize,
                        NESTED)
    high = tl.load(code_ptr + (byte >> 4), mask=inside, other=0.0) * scale
    low = tl.load(code_ptr + (byte & 15), mask=inside, other=0.0) * scale
    j = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + j, tl.interleave(high, low).to(out_ptr.dtype.element_ty), mask=j < 2 * n_bytes)


@triton.jit(do_not_specialize=["n_elements", "k"])
def dequant_int8_kernel(cb_ptr, scale_ptr, out_ptr, n_elements, k, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    inside = j < n_elements
    # CB in the output dtype is exact (int8 values); bitsandbytes multiplies in fp32 and rounds once
    cb = tl.load(cb_ptr + j, mask=inside, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + j // k, mask=inside, other=0.0)
    tl.store(out_ptr + j, (cb * scale).to(out_ptr.dtype.element_ty), mask=inside)
