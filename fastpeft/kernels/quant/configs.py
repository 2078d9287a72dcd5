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

# The fused decode kernel (``quant.decode_kernel``): up to DECODE_BLOCK_M rows (a decode step,
# or a few sequences' worth), padded to 16 rows, the smallest tl.dot (as the LoRA kernels'
# decode tiles: ``fastpeft.kernels.lora.configs.DECODE_MAX_M``).
DECODE_BLOCK_M = 16
# Output columns per program: 16, the narrowest tl.dot operand, for the most programs: 256 at
# N = 4096 (~2 per SM on a 132-SM H100). Estimate, not tuned on a GPU: at N <= 2048 the
# programs do not fill a wave, and a split over K (fixed-order partial sums, as the LoRA
# kernels' split-K) is the next step if a GPU run shows the kernel short of the bandwidth.
DECODE_BLOCK_N = 16
# Codes of W per step along K, and steps in flight: the per-element gathers (codes, scales,
# nested scales) are staged through shared memory by the pipeliner, so 128 x 2 stages keeps a
# program at <= 104 registers and 32 KB of shared memory (``fastpeft check``, sm_80/sm_90),
# room for ~4 programs per SM; 256 x 3 stages took 120 KB (one program per SM) and 256 x 2 up
# to 225 registers.
DECODE_BLOCK_K = 128
DECODE_WARPS = 4
DECODE_STAGES = 2
# Ranks the decode kernel takes: padded to a power of two >= 16 (tl.dot's minimum), up to 64
# as the LoRA kernels (``fastpeft.kernels.lora.configs.BLOCK_R_CHOICES``); larger ranks take the
# dequantize-then-GEMM path.
DECODE_BLOCK_R_CHOICES = (16, 32, 64)
# (compute dtype, adapter dtype) pairs the decode kernel is compiled for on a GPU: PEFT's fp32
# adapters and adapters in the compute dtype, on a 16-bit compute dtype. An fp32 compute dtype
# runs it only in the interpreter (the tests' exact fp32 check of the dequantization): on a GPU
# its IEEE fp32 tl.dot spills 13-17 KB per program (``fastpeft check``), and fp32 activations
# take the torch path there, as in the LoRA op.
DECODE_DTYPE_PAIRS = (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp16", "fp16"))
INTERPRETER_DECODE_DTYPE_PAIRS = DECODE_DTYPE_PAIRS + (("fp32", "fp32"),)
