"""Launchers of the quantized-weight kernels: ``dequantize`` (``quant.kernels``), a quantized
weight into a new ``[N, K]`` tensor in ``dtype`` in one launch (what ``ref.dequantize`` computes,
bit for bit), and ``decode_forward`` (``quant.decode_kernel``), the fused base + LoRA product of
a few rows on the packed weight. Both launch on the weight's device with FP fusion off, so the
double quantization's scales round as torch's do."""

from __future__ import annotations

import math

import torch

from fastpeft.kernels import launch_device
from fastpeft.kernels.launch_device import kernel_numerics, on_device_of
from fastpeft.kernels.lora.configs import ALIGN, block_r
from fastpeft.kernels.quant import configs
from fastpeft.kernels.quant.decode_kernel import qlora_decode_kernel
from fastpeft.kernels.quant.kernels import dequant_4bit_kernel, dequant_int8_kernel
from fastpeft.kernels.quant.ref import INT8_TYPES, int8_row_scale, packed_bytes


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


def _nested_args(absmax, nested_absmax, nested_code, offset, nested_blocksize) -> tuple:
    """The kernels' double-quantization arguments: the nested state, or (without double
    quantization) placeholders the kernels never read."""
    if nested_absmax is None:
        return absmax, absmax, absmax, 1
    return nested_absmax, nested_code, offset.reshape(1), nested_blocksize


def _launch(quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape,
            dtype, n) -> torch.Tensor:
    out = launch_device.empty_output(shape, dtype, packed.device)
    if quant_type in INT8_TYPES:
        scale = int8_row_scale(quant_type, absmax)
        dequant_int8_kernel[_grid(n, configs.BLOCK_INT8)](
            packed.contiguous(), scale, out, n, shape[1],
            BLOCK=configs.BLOCK_INT8, num_warps=configs.NUM_WARPS, num_stages=configs.NUM_STAGES,
            enable_fp_fusion=False,
        )
        return out
    *nested_state, nested_blocksize = _nested_args(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    dequant_4bit_kernel[_grid(n // 2, configs.BLOCK_BYTES)](
        packed_bytes(packed).contiguous(), absmax, code, *nested_state, out, n // 2, blocksize, nested_blocksize,
        NESTED=nested_absmax is not None, BLOCK=configs.BLOCK_BYTES, num_warps=configs.NUM_WARPS,
        num_stages=configs.NUM_STAGES,
        enable_fp_fusion=False,
    )
    return out


def decode_fits(m: int, n: int, k: int, rank: int, compute_dtype: torch.dtype, lora_dtype: torch.dtype,
                device: torch.device) -> bool:
    """Whether ``decode_forward`` takes the problem: 1 to ``configs.DECODE_BLOCK_M`` rows, a rank
    the kernel pads (<= 64), 32-bit indices, and on a GPU a compiled (compute, adapter) dtype pair
    and N and K multiples of 16 (the specialization ``fastpeft check`` compiles; the interpreter
    compiles nothing, so the tests keep their odd shapes and an fp32 case)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    pair = (names.get(compute_dtype), names.get(lora_dtype))
    on_gpu = device.type == "cuda"
    pairs = configs.DECODE_DTYPE_PAIRS if on_gpu else configs.INTERPRETER_DECODE_DTYPE_PAIRS
    return (1 <= m <= configs.DECODE_BLOCK_M and 1 <= rank <= max(configs.DECODE_BLOCK_R_CHOICES)
            and pair in pairs and n * k <= configs.MAX_ELEMENTS
            and (not on_gpu or (n % ALIGN == 0 and k % ALIGN == 0)))


def decode_forward(x: torch.Tensor, quant_type: str, packed: torch.Tensor, absmax: torch.Tensor,
                   code: torch.Tensor | None, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                   offset: torch.Tensor | None, blocksize: int, nested_blocksize: int, bias: torch.Tensor | None,
                   s_scaled: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``y [M, N]`` in x's dtype (``quant.decode_kernel``'s formula) for x ``[M, K]`` in the
    compute dtype, the quantized weight's arguments (as ``dequantize``'s), the bias in the compute
    dtype or None, ``s_scaled = scaling * dropout(x) A^T`` ``[M, r]`` and B ``[N, r]`` in the
    adapter's dtype; the problem must ``decode_fits``."""
    m, k = x.shape
    n, rank = lora_b.shape
    int8 = quant_type in INT8_TYPES
    if int8:  # the row scales in absmax's place, standing in for the (unread) code table too
        packed, absmax = packed.contiguous(), int8_row_scale(quant_type, absmax)
        code = absmax
    else:
        packed = packed_bytes(packed).contiguous()
    *nested_state, nested_blocksize = _nested_args(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    with on_device_of(x):
        x, s_scaled, lora_b = x.contiguous(), s_scaled.contiguous(), lora_b.contiguous()
        y = launch_device.empty_output((m, n), x.dtype, x.device)
        qlora_decode_kernel[_grid(n, configs.DECODE_BLOCK_N)](
            x, packed, absmax, code, *nested_state, bias if bias is not None else x, s_scaled, lora_b, y,
            # one row: its stride is k whatever the view said (the specialization checked is K's)
            m, n, k, rank, blocksize, nested_blocksize, x.stride(0) if m > 1 else k, s_scaled.stride(0),
            lora_b.stride(0), y.stride(0),
            INT8=int8, NESTED=nested_absmax is not None, HAS_BIAS=bias is not None,
            BLOCK_M=configs.DECODE_BLOCK_M, BLOCK_N=configs.DECODE_BLOCK_N, BLOCK_K=configs.DECODE_BLOCK_K,
            BLOCK_R=block_r(rank), num_warps=configs.DECODE_WARPS, num_stages=configs.DECODE_STAGES,
            enable_fp_fusion=False, **kernel_numerics(x.dtype, lora_b.dtype),
        )
    return y
