"""bitsandbytes' own compiled CPU dequantization, where it computes exactly what
``quant.ref`` does (``tests/kernels/quant/test_dequantize.py`` checks it bit for bit): 4-bit
weights whose rows are whole blocks (bitsandbytes 0.50's CPU kernel mislocates the scales of
blocks that straddle rows) below the 2048-element blocks its own code sends to its reference,
and the double quantization's 8-bit scales. Its C++ kernels run a 1024 x 1024 NF4 weight
several times faster than the torch ops of ``ref`` (1.6 vs 8.7 ms on two busy cores); the
torch path of ``fastpeft.ops.qlora_linear`` takes them on the CPU when bitsandbytes is loaded."""

from __future__ import annotations

import sys

import torch

# bitsandbytes sends larger blocks to its reference implementation (AVX512 accuracy).
_CPU_KERNEL_MAX_BLOCKSIZE = 2048


def dequantize_4bit_cpu(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                        nested_code: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int,
                        nested_blocksize: int, quant_type: str, shape: tuple[int, int],
                        dtype: torch.dtype) -> torch.Tensor | None:
    """W by bitsandbytes' CPU kernels, or None where they would not give ``ref``'s result (or
    bitsandbytes is not loaded, or the tensors are not on the CPU)."""
    if "bitsandbytes" not in sys.modules or packed.device.type != "cpu":
        return None
    if shape[1] % blocksize or blocksize >= _CPU_KERNEL_MAX_BLOCKSIZE:
        return None
    ops = torch.ops.bitsandbytes
    scales = absmax
    if nested_absmax is not None:
        scales = ops.dequantize_blockwise.default(absmax, nested_absmax, nested_code, nested_blocksize,
                                                  torch.float32) + offset
    return ops.dequantize_4bit.default(packed, scales, blocksize, quant_type, shape, dtype)
