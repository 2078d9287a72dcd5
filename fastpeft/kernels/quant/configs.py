"""Launch configuration of the dequantization kernels (``quant.kernels``)."""

from __future__ import annotations

# Packed bytes per program of the 4-bit kernel (two elements each: 2048 outputs, 4 KB of bf16
# written): 16-byte loads of the codes per thread at 4 warps (128 threads x 8 bytes, twice),
# and enough programs to fill the SMs from ~2 M weights up (a 4096 x 4096 layer: 4096
# programs, 31 waves of 132 SMs).
BLOCK_BYTES = 1024
# Elements per program of the int8 kernel (the same 2048 outputs).
BLOCK_INT8 = 2048
NUM_WARPS = 4
NUM_STAGES = 1
# The kernels index with 32-bit integers: a weight of more elements is refused (2^31 - 1;
# the largest LLM projections hold ~0.5 G).
MAX_ELEMENTS = 2**31 - 1
# Output dtypes the kernels write (bitsandbytes' compute dtypes).
OUT_DTYPES = ("fp32", "bf16", "fp16")
