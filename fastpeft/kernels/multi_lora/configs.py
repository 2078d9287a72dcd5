"""Tile choices of the multi-adapter LoRA kernels (``multi_lora.kernels``).

Every tile here is listed by ``multi_lora.specs`` so ``fastpeft check`` compiles it for sm_80
and sm_90. The values are starting points chosen from the problem's shape (reason beside
each); no GPU has tuned them yet. Nothing here looks at device memory: the choice depends on
T (tokens), R_MAX (slot rank), the output width, K and the SM count (the decode shrink's
split) only, so it is fixed for a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpeft.kernels.lora import configs as lora_configs

# Up to this many tokens a call takes the decode (BGMV) kernels: one vector product per token,
# no sort. A decode step has one token per sequence; sorting them (a sort, two searchsorted,
# a cumsum: ~6 small launches) costs more than re-reading an adapter shared by a few tokens
# from L2. Above it, tokens are sorted into segments and tiles run tensor cores.
DECODE_MAX_TOKENS = 32

# Largest slot rank the kernels take (issue 11: ranks 1 to 256). The rank is a loop (expand,
# wgrad) or a grid dimension (shrink) in blocks of ``rank_block``, so larger ranks only cost
# more blocks; 256 bounds the fp32 ``s`` buffer at 1 KB per token.
MAX_SLOT_RANK = 256

# Rank blocks: tl.dot needs >= 16; 64 keeps the [BLOCK_M, BLOCK_R] fp32 s tile and the
# [BLOCK_R, BLOCK_N] B tile beside a 64 x 64 accumulator within 4 warps' registers.
RANK_BLOCKS = (16, 32, 64)


@dataclass(frozen=True)
class Tile:
    """A launch's tile: ``block_m`` rows (tokens), ``block_n`` output columns (or the
    reduction's step for the shrink), ``block_r`` rank columns, warps and stages."""

    block_m: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int


def rank_block(r_max: int) -> int:
    """Smallest rank block in ``RANK_BLOCKS`` covering ``r_max`` (the largest otherwise)."""
    return next((b for b in RANK_BLOCKS if r_max <= b), RANK_BLOCKS[-1])


# Decode shrink: a 4-rank x 64-column slice of A_i per step (512 B of bf16), one warp: 8
# elements a thread, one 16-byte load of bf16 (two of fp32). Program (token, 4 ranks, K split):
# the grid is T x cdiv(R_MAX, 4) x S, and the expand re-reads all S partials of a token per
# column block, so narrow rank blocks fill the GPU with few splits. At T = 1, r = 16, K = 4096
# on an H100: 4 rank blocks x 33 splits = 132 programs, and the expand's 256 column blocks
# re-read 256 x 33 x 64 B = 0.54 MB of partials from L2; 16-rank blocks would need 132 splits
# of 16-column steps and re-read 2.2 MB. The price: x's row is read once per rank block
# (cdiv(r, 4) x K x 2 B: 32 KB at r = 16, a quarter of A_i's 128 KB; L2 hits, as a token's
# rank blocks are consecutive programs).
DECODE_SHRINK = Tile(block_m=1, block_n=64, block_r=4, num_warps=1, num_stages=2)
# Partials the decode expand loads at once when it sums the shrink's splits: 32 x 16 ranks of
# fp32 (2 KB: 16 values a thread of one warp, 4 of four warps: 16-byte loads either way), so
# the 33 splits of T = 1, r = 16 cost two L2 round trips, not 33.
DECODE_SPLIT_BLOCK = 32
# Decode expand: rank steps of 16 (B_i's rows are R_MAX apart: a 16-rank slice of a row is a
# 32-byte sector of bf16) and the widest column block of DECODE_EXPAND_BLOCK_NS that still
# gives one program per SM (T x cdiv(N, BLOCK_N) >= SMs; the narrowest if none does): every
# column block re-reads its token's S x r x 4 bytes of partials, so the fewest blocks that
# fill the GPU. On an H100 (132 SMs), N = 4096: 128 columns from T = 5 (160 programs), 16 at
# T = 1 (256 programs; 32 columns give 128). N = 14336: 64 columns at T = 1 (224).
DECODE_EXPAND_BLOCK_NS = (128, 64, 32, 16)
DECODE_EXPAND_BLOCK_R = 16
# Stages: as the shrink's; the rank loop holds no tl.dot for Triton's pipeliner, and a rank-16
# slot runs it once.
DECODE_EXPAND_STAGES = 2
# The decode expand's R_ALIGN (a divisor of R_MAX it may assume, as R_MAX is exempt from
# specialization): 8 elements, a 16-byte vector of bf16 (two of fp32), for the usual slot
# ranks (8, 16, 32, 64...); 1 for the rest, which load the rank one element at a time.
DECODE_RANK_ALIGNS = (8, 1)


def decode_rank_align(r_max: int) -> int:
    """The largest of ``DECODE_RANK_ALIGNS`` dividing ``r_max``."""
    return next(a for a in DECODE_RANK_ALIGNS if r_max % a == 0)


def decode_expand_tile_of(block_n: int) -> Tile:
    """The decode expand's tile for ``block_n`` columns: ``block_n / 32`` warps (one for 16), so
    the ``[block_n, 16]`` B tile is 16 elements a thread (8 at 16 columns): whole 16-byte
    loads of bf16 and fp32 adapters at every width."""
    return Tile(1, block_n, DECODE_EXPAND_BLOCK_R, max(1, block_n // 32), DECODE_EXPAND_STAGES)


# Segments of sorted tokens: 16-row tiles while a batch is small (a segment of few tokens
# wastes at most 15 rows of a tile; the loop is bandwidth-bound on the adapters), 64-row
# tiles from SEGMENT_LARGE_T tokens (prefill: adapters hold hundreds of tokens, and 64 rows
# quarter the re-reads of A and B per token).
SEGMENT_LARGE_T = 512
# Shrink: K steps of 64 (fp32 operands: 64 x 64 x 4 B = 16 KB per stage), 4 warps.
# Expand: 64 output columns per program, rank steps of rank_block(R_MAX).
_SEGMENT_BLOCK_M = {False: 16, True: 64}
SHRINK_BLOCK_K = 64
EXPAND_BLOCK_N = 64
SEGMENT_WARPS = 4
SEGMENT_STAGES = 2


def segment_block_m(num_tokens: int) -> int:
    """Rows per segment tile for a call with ``num_tokens`` tokens."""
    return _SEGMENT_BLOCK_M[num_tokens >= SEGMENT_LARGE_T]


def shrink_tile(num_tokens: int, r_max: int) -> Tile:
    return Tile(segment_block_m(num_tokens), SHRINK_BLOCK_K, rank_block(r_max), SEGMENT_WARPS, SEGMENT_STAGES)


# Rank step of the 64-row expand tile: with 64-wide steps the [64, 64] fp32 s tile, the
# [64, 64] B tile and the 64 x 64 accumulator spill 8 bytes on sm_80 with fp32 adapters
# (fastpeft check); the rank is a loop there, so a narrower step only adds iterations.
EXPAND_LARGE_MAX_BLOCK_R = 32


def expand_rank_block(block_m: int, r_max: int) -> int:
    """The expand's rank step for ``block_m``-row tiles and slot rank ``r_max``."""
    block_r = rank_block(r_max)
    return min(block_r, EXPAND_LARGE_MAX_BLOCK_R) if block_m > _SEGMENT_BLOCK_M[False] else block_r


def expand_tile(num_tokens: int, r_max: int) -> Tile:
    block_m = segment_block_m(num_tokens)
    return Tile(block_m, EXPAND_BLOCK_N, expand_rank_block(block_m, r_max), SEGMENT_WARPS, SEGMENT_STAGES)


# dA / dB: a program owns [block_r, 64] of one adapter's gradient and walks its tokens 32 rows
# at a time (a [32, 64] widened x tile and a [32, block_r] fp32 lhs tile per step), 4 warps.
WGRAD_BLOCK_M = 32
WGRAD_BLOCK_C = 64


def wgrad_tile(r_max: int) -> Tile:
    return Tile(WGRAD_BLOCK_M, WGRAD_BLOCK_C, rank_block(r_max), SEGMENT_WARPS, SEGMENT_STAGES)


def balanced_splits(programs: int, steps: int, num_sms: int) -> int:
    """Splits S of a bandwidth-bound reduction of ``steps`` steps run by ``programs``
    independent programs (before splitting), dealt out evenly (``kernels._split_range``): at
    least one program per SM (``S >= cdiv(SMs, programs)``), at most one split per step, and
    among ``cdiv(SMs, programs)`` to twice that the S whose busiest SM has the least work,
    ``cdiv(programs x S, SMs) / S`` of a program's reduction, the fewest on a tie: each split
    adds a partial that the next kernel reads back, and past twice the fewest the partials
    double for what little imbalance is left. Grids already a wave wide are not split."""
    if programs >= num_sms:
        return 1
    fewest = cdiv(num_sms, programs)
    steps = max(1, steps)
    candidates = range(min(fewest, steps), min(2 * fewest, steps) + 1)
    return min(candidates, key=lambda splits: (cdiv(programs * splits, num_sms) / splits, splits))


def decode_shrink_splits(num_tokens: int, r_max: int, k: int, device: torch.device) -> int:
    """Splits S of the decode shrink's K over ``T x cdiv(R_MAX, 4)`` (token, rank block)
    programs, in steps of ``DECODE_SHRINK.block_n`` columns (``balanced_splits``). The expand
    re-reads every split's partial once per column block. H100, K = 4096, r = 16: S = 33 at
    T = 1 (132 programs, one per SM), S = 4 at T = 16 (256 programs, two per SM: S = 3 would
    leave 60 SMs with two programs of a third of K and the rest with one). Depends on T,
    R_MAX, K and the SM count only (fixed for a CUDA graph)."""
    # Through the module: the planner's recording and the tests replace lora_configs.device_info.
    num_sms, _ = lora_configs.device_info(device)
    programs = num_tokens * cdiv(r_max, DECODE_SHRINK.block_r)
    return balanced_splits(programs, cdiv(k, DECODE_SHRINK.block_n), num_sms)


def segment_shrink_splits(num_tiles: int, num_tokens: int, r_max: int, red: int, device: torch.device) -> int:
    """Splits of the segment shrink's reduction (``red`` columns in steps of SHRINK_BLOCK_K)
    over its ``num_tiles`` x rank blocks programs (``balanced_splits``); the expand
    re-reads each split's rows once per column block. The forward's, for 64 distinct
    adapters at T = 64 (68 tiles of 16 rows, one rank block) on an H100: 3 splits, 204
    programs; unsplit, 64 SMs stream the adapters' A (8 MB) and 68 sit idle."""
    num_sms, _ = lora_configs.device_info(device)
    programs = num_tiles * cdiv(r_max, shrink_tile(num_tokens, r_max).block_r)
    return balanced_splits(programs, cdiv(red, SHRINK_BLOCK_K), num_sms)


def decode_expand_tile(num_tokens: int, n: int, device: torch.device) -> Tile:
    """The decode expand's tile for T tokens and N output columns (``DECODE_EXPAND_BLOCK_NS``)."""
    num_sms, _ = lora_configs.device_info(device)
    block_n = next((b for b in DECODE_EXPAND_BLOCK_NS if num_tokens * cdiv(n, b) >= num_sms),
                   DECODE_EXPAND_BLOCK_NS[-1])
    return decode_expand_tile_of(block_n)


def all_segment_block_ms() -> tuple[int, ...]:
    """Every ``segment_block_m`` value (for the specs)."""
    return tuple(sorted(set(_SEGMENT_BLOCK_M.values())))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Activation dtypes the kernels take on a GPU (fp32 and float64 take the torch path there: an
# fp32 tl.dot at IEEE precision runs on FMA units and spills the 64-row tiles on sm_80);
# the interpreter also runs fp32, which the tests use.
GPU_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
# Adapter dtypes the kernels take: the activations' or PEFT's fp32.
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Sizes and pointers a GPU launch must have so that Triton compiles the variant ``fastpeft
# check`` compiled (multiples of 16 / 16-byte aligned: ``multi_lora.specs``).
ALIGN = 16


def kernel_friendly(sizes: tuple[int, ...], tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether a CUDA launch with these integer arguments (K, N, row strides) and tensors gets
    the checked specialization; other problems take the torch path on a GPU."""
    return all(s % ALIGN == 0 for s in sizes) and all(t.data_ptr() % ALIGN == 0 for t in tensors)
