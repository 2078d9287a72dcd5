"""bitsandbytes' own compiled dequantization, where it computes exactly what ``quant.ref`` does:

- on CUDA, always: its CUDA kernels define the semantics ``ref`` reproduces (``dequantize_4bit``
  / ``dequantize_blockwise``), and they are what PEFT's layers run on the same weight -- one read
  of the packed codes and one write of W per launch, where ``ref``'s torch ops take ~19
  launches and ~100x the weight's bytes (``fastpeft plan --ops qlora``). Not run here: no GPU
  has compared them with ``ref`` yet (the GPU script's QLoRA tests do);
- on the CPU, for 4-bit weights whose rows are whole blocks (bitsandbytes 0.50's CPU kernel
  mislocates the scales of blocks that straddle rows) below the 2048-element blocks its own code
  sends to its reference (``tests/kernels/quant/test_dequantize.py`` checks it bit for bit): a
  1024 x 1024 NF4 weight several times faster than ``ref``'s torch ops (1.6 vs 8.7 ms on two
  busy cores).

The torch path of ``fastpeft.ops.qlora_linear`` takes them when bitsandbytes is loaded (it is,
whenever the weight came from a bitsandbytes layer)."""

from __future__ import annotations

import sys

import torch

# bitsandbytes sends larger blocks to its reference implementation (AVX512 accuracy).
_CPU_KERNEL_MAX_BLOCKSIZE = 2048


def bitsandbytes_dequantizes_exactly(device: torch.device, k: int, blocksize: int) -> bool:
    """Whether bitsandbytes' own kernels give ``ref``'s 4-bit dequantization of a ``[N, k]``
    weight in blocks of ``blocksize`` on ``device`` (module docstring); False when bitsandbytes
    is not loaded."""
    if "bitsandbytes" not in sys.modules:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and k % blocksize == 0 and blocksize < _CPU_KERNEL_MAX_BLOCKSIZE


def bitsandbytes_dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                                 nested_code: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int,
                                 nested_blocksize: int, quant_type: str, shape: tuple[int, int],
                                 dtype: torch.dtype) -> torch.Tensor:
    """W ``shape`` in ``dtype`` by bitsandbytes' ops (``ref.dequantize``'s 4-bit arguments; the
    double quantization's scales first, in fp32, plus ``offset``, as bitsandbytes forms them)."""
    ops = torch.ops.bitsandbytes
    scales = absmax
    if nested_absmax is not None:
        scales = ops.dequantize_blockwise.default(absmax, nested_absmax, nested_code, nested_blocksize,
                                                  torch.float32) + offset
    return ops.dequantize_4bit.default(packed, scales, blocksize, quant_type, shape, dtype)
