"""Reference dequantization of the quantized base weights a QLoRA layer runs on, in torch ops:
bit for bit what bitsandbytes' reference implementation computes (its ``dequantize_4bit`` /
``dequantize_blockwise`` semantics, shared by its CUDA kernels; its CPU kernel where that is
right) and, for int8, its CPU layers' training-mode dequantization (on CUDA bitsandbytes' int8
layers multiply int8 activations instead), so on the CPU a layer on a quantized base gives
exactly the base output bitsandbytes' own layer gives.

4-bit (``quant_type`` ``"nf4"`` or ``"fp4"``), W ``[N, K]`` stored as ``packed``: N*K/2 bytes
(any storage dtype, read as uint8), two 4-bit codes per byte, the high nibble first, in
row-major order of W; blocks of ``blocksize`` consecutive elements share a scale:

    W.flat[i] = code[nibble_i] * absmax[i // blocksize]         (fp32, then rounded to dtype)

``code`` is the 16-value table (NF4's normal quantiles or FP4's values). With double
quantization the per-block scales are themselves 8-bit codes of blocks of
``nested_blocksize`` scales:

    absmax[j] = nested_code[absmax_u8[j]] * nested_absmax[j // nested_blocksize] + offset

int8 (bitsandbytes ``Linear8bitLt``): ``CB [N, K]`` int8 and ``SCB [N]`` fp32 row maxima,
``W = CB * SCB / 127`` (in the compute dtype, as bitsandbytes' ``MatMul8bitFp``).

int8 with row scales (``"int8-scaled"``: torchao's int8 weight-only ``Int8Tensor``, per-row or
per-tensor, symmetric): ``qdata [N, K]`` int8 and fp32 row scales ``s [N]``, ``W = qdata * s``
(the fp32 product rounded once to the dtype, as torchao's ``dequantize()``).

torchao's NF4 (``"nf4-torchao"``: its ``NF4Tensor``, ``to_nf4``): the same packing of 4-bit codes
(two per byte, high nibble first, blocks of ``blocksize`` over the row-major weight), a 16-value
table ``code`` and block scales double-quantized linearly -- int8 ``absmax`` per block, one
factor per ``nested_blocksize`` blocks (``nested_absmax``), the mean ``offset`` -- with every
operation in the weight's own dtype (``code.dtype``), as its ``get_original_weight()``:

    scale[j] = (absmax[j] / nested_absmax[j // nested_blocksize]) -> weight dtype + offset
    W.flat[i] = code[nibble_i] * scale[i // blocksize]                (in the weight dtype)
"""

from __future__ import annotations

import math

import torch

NF4, FP4, INT8, INT8_SCALED, NF4_TORCHAO = "nf4", "fp4", "int8", "int8-scaled", "nf4-torchao"
QUANT_TYPES = (NF4, FP4, INT8, INT8_SCALED, NF4_TORCHAO)
# The int8 kinds: int8 codes ``[N, K]`` and one scale per row.
INT8_TYPES = (INT8, INT8_SCALED)
# int8 rows are scaled to [-127, 127] by their absolute maximum (bitsandbytes' vector-wise quantization).
INT8_MAX = 127


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed 4-bit codes as a flat uint8 tensor, whatever their storage dtype."""
    return packed.reshape(-1).view(torch.uint8)


def _scaled_by_block(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * scales[i // blocksize]`` (fp32), the last block possibly partial."""
    n = values.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (padded * scales[:blocks].view(-1, 1)).reshape(-1)[:n]


def blockwise_scales(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                     nested_blocksize: int, offset: torch.Tensor | None) -> torch.Tensor:
    """The fp32 per-block scales: ``absmax`` itself, or with double quantization (uint8
    ``absmax`` and the nested state given) its dequantization plus ``offset``."""
    if nested_absmax is None:
        return absmax
    return _scaled_by_block(nested_code[absmax.reshape(-1).to(torch.int64)], nested_absmax, nested_blocksize) + offset


def dequantize_4bit(packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """W ``shape`` in ``dtype`` from 4-bit ``packed`` codes, fp32 block ``scales``
    (``blockwise_scales``) and the 16-value ``code`` table (module docstring)."""
    data = packed_bytes(packed)
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:math.prod(shape)].to(torch.int64)
    return _scaled_by_block(code[nibbles], scales, blocksize).view(shape).to(dtype)


def int8_row_scale(quant_type: str, absmax: torch.Tensor) -> torch.Tensor:
    """The fp32 factor of each row of an int8 weight: bitsandbytes' ``SCB / 127`` (formed as it
    forms it), or the row scales themselves (``"int8-scaled"``)."""
    return absmax.mul(1.0 / INT8_MAX) if quant_type == INT8 else absmax


def dequantize_int8(cb: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W ``[N, K]`` in ``dtype`` from int8 ``cb`` and fp32 ``row_scale`` ``[N]``: each product in
    fp32, rounded once (``int8_row_scale``; module docstring)."""
    return cb.to(dtype).mul_(row_scale.unsqueeze(1))


def dequantize_nf4_torchao(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                           factors: torch.Tensor, mean: torch.Tensor, blocksize: int, nested_blocksize: int,
                           shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """W ``shape`` in ``dtype`` from torchao's NF4 parts (module docstring), bit for bit its
    ``get_original_weight()`` then cast."""
    data = packed_bytes(packed)
    values = code[torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1).to(torch.int64)]
    scaler_blocks = absmax.numel() // nested_blocksize
    scales = (absmax.view(scaler_blocks, nested_blocksize) / factors.reshape(-1, 1)).reshape(-1).to(code.dtype)
    return (values.view(-1, blocksize) * (scales + mean.reshape(())).unsqueeze(-1)).view(shape).to(dtype)


def dequantize(quant_type: str, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
               blocksize: int, nested_blocksize: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """W ``shape`` in ``dtype`` for any ``quant_type`` of ``QUANT_TYPES`` (int8: ``packed`` is
    CB, ``absmax`` SCB or the row scales, the other arguments unused; torchao's NF4:
    ``nested_absmax`` holds its factors, ``offset`` its mean)."""
    if quant_type in INT8_TYPES:
        return dequantize_int8(packed, int8_row_scale(quant_type, absmax), dtype)
    if quant_type == NF4_TORCHAO:
        return dequantize_nf4_torchao(packed, absmax, code, nested_absmax, offset, blocksize, nested_blocksize, shape,
                                      dtype)
    scales = blockwise_scales(absmax, nested_absmax, nested_code, nested_blocksize, offset)
    return dequantize_4bit(packed, scales, code, blocksize, shape, dtype)
