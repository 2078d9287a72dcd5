"""Launchers of the dequantization kernels (``quant.kernels``): a quantized weight into a new
``[N, K]`` tensor in ``dtype``, in one launch, on the weight's device (what ``ref.dequantize``
computes, bit for bit; FP fusion off so the double quantization's scales round as torch's do)."""

from __future__ import annotations

import math

import torch

from fastpeft.kernels import launch_device
from fastpeft.kernels.launch_device import on_device_of
from fastpeft.kernels.quant import configs
from fastpeft.kernels.quant.kernels import dequant_4bit_kernel, dequant_int8_kernel
from fastpeft.kernels.quant.ref import INT8, INT8_MAX, packed_bytes


def _grid(n: int, block: int) -> tuple[int]:
    return (max(1, -(-n // block)),)


def dequantize(quant_type: str, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None,
               nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
               blocksize: int, nested_blocksize: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``ref.dequantize``'s result (same arguments) by one kernel launch."""
    n = math.prod(shape)
    if n > configs.MAX_ELEMENTS:
        raise ValueError(f"dequantize: a weight of {n} elements is over the kernels' 32-bit index limit")
    with on_device_of(packed):
        return _launch(quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                       nested_blocksize, shape, dtype, n)


def _launch(quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
            dtype, n) -> torch.Tensor:
    out = launch_device.empty_output(shape, dtype, packed.device)
    if quant_type == INT8:
        scale = absmax.mul(1.0 / INT8_MAX)  # bitsandbytes' row scale, formed as it forms it
        dequant_int8_kernel[_grid(n, configs.BLOCK_INT8)](
            packed.contiguous(), scale, out, n, shape[1],
            BLOCK=configs.BLOCK_INT8, num_warps=configs.NUM_WARPS, num_stages=configs.NUM_STAGES,
        )
        return out
    data = packed_bytes(packed)
    nested = nested_absmax is not None
    placeholder = absmax  # never read without double quantization
    dequant_4bit_kernel[_grid(n // 2, configs.BLOCK_BYTES)](
        data.contiguous(), absmax, code, nested_absmax if nested else placeholder,
        nested_code if nested else placeholder, offset.reshape(1) if nested else placeholder, out,
        n // 2, blocksize, nested_blocksize if nested else 1,
        NESTED=nested, BLOCK=configs.BLOCK_BYTES, num_warps=configs.NUM_WARPS, num_stages=configs.NUM_STAGES,
        enable_fp_fusion=False,
    )
    return out
