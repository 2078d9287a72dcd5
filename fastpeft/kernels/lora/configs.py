"""Which kernel configuration the LoRA launchers use for a given problem.

Every configuration returned here is listed by ``lora_kernel_specs`` so ``fastpeft check``
compiles it ahead of time for sm_80 and sm_90: every tile in the tables below compiles with
0 bytes of register spills, within the shared-memory limit, without GPU-wide fences, and
(sm_90, tiles of >= 64 rows) with wgmma (``fastpeft check --arch sm_80,sm_90``, Triton 3.9
and 3.6). The tables are starting points chosen from the shapes of the problem (rationale
beside each constant); they have not yet been tuned on a GPU (see bench/RESULTS.md).

The check compiles the launch-time specialization that Triton's launcher makes for aligned
problems (see ``kernel_friendly``): on a GPU, problems that are not aligned must take another
path, or they would run code nobody compiled ahead of time (scalar loads instead of 16-byte
``cp.async``, and up to 2.6 KB of spills).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

# LoRA ranks the Triton kernels take: the rank is padded to a power of two >= 16 (tl.dot
# needs every dimension >= 16) and kept <= 64: with rank 128 the fp32 s tile and the B tile
# beside the GEMM accumulator spill registers on every tile worth using (fastpeft check).
# Larger ranks use the torch composite path.
MIN_BLOCK_R = 16
MAX_RANK = 64
BLOCK_R_CHOICES = (16, 32, 64)

# Up to this many rows the forward is a decode step: bandwidth-bound on W, so tiles are
# 16 rows (the smallest tl.dot) and narrow in N so that enough programs stream W.
DECODE_MAX_M = 16
# Up to this many rows, 64-row tiles keep enough programs in flight for the GPU.
MEDIUM_MAX_M = 512

# Peak bf16 tensor FLOP/s over HBM bytes/s on an H200 (~790e12 / 4.3e12, KERNEL_NOTES.md).
# Recomputing s = x A^T in every column tile costs ~BLOCK_R/BLOCK_N of the GEMM's time;
# an extra pass over x (the separate shrink kernel) costs ~FLOPS_PER_BYTE/N of it.
FLOPS_PER_BYTE = 184

# Rows of the grouped tile ordering: 8 row-tiles share each sweep of W's tiles in L2
# (the value of Triton's matmul tutorial).
GROUP_M = 8

# Largest s tile (BLOCK_M x BLOCK_R, fp32) a GEMM tile may accumulate beside its own
# accumulator when the shrink is fused: 128 x 64 spills next to the 128 x 256 tile on sm_90
# with fp32 adapters (their x tiles are widened to fp32 for the tf32 dot).
MAX_FUSED_S_TILE = 64 * 64

# Programs per SM to aim for when splitting the bandwidth-bound rank-r passes (shrink, dS,
# dA, dB): 2 hides one program's latency behind another's without making the partial
# buffers large.
PROGRAMS_PER_SM = 2

# Fewest reduction steps (tiles of the reduced dimension) per split, for the shrink / dS
# passes and the GEMMs' split-K. Each split leaves an fp32 partial that is written, read
# back and summed in a fixed order by a later program, one partial after another (a chain of
# dependent L2 loads): with one step per split the partials cost more than the split's own
# loads (an M = 512 forward had 32 shrink partials of one K-step each, summed serially by
# every GEMM program). At 8 steps a split loads at least 8 tiles per partial it leaves
# (K = 4096 has at most 4 shrink partials), and a 64 x 128 GEMM split's partial is ~1/3 of
# its loads.
MIN_STEPS_PER_SPLIT = 8

# SM count assumed under the Triton interpreter (no GPU): small, so that tests exercise
# the split paths on small shapes.
INTERPRETER_SMS = 4

# Triton's launcher compiles a separate variant when an integer argument is a multiple of 16
# or a pointer is 16-byte aligned (tt.divisibility = 16), and when an integer is 1 (a
# constexpr); ``kernel_friendly`` admits only problems whose sizes, strides and pointers give
# the variant ``fastpeft check`` compiles.
ALIGN = 16
# Integer kernel arguments are i32 below this, i64 (another variant) from it.
_I32_LIMIT = 2**31


@dataclass(frozen=True)
class TileConfig:
    """Tile of a GEMM-like kernel: BLOCK_M rows x BLOCK_N output columns, BLOCK_K reduction."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Base-GEMM tiles (forward y = x W^T, backward dX = dY W) per regime and architecture.
# Every entry compiles without register spills (fastpeft check), with the LoRA epilogue in
# the adapter's dtype (tf32 on fp32 adapters); none is tuned on a GPU yet.
# sm_90: 128x256x64, 8 warps (two warpgroups) is the wgmma tile of Triton's Hopper matmul
# examples (m64n256 per warpgroup); 3 stages of (128+256)x64 bf16 = 144 KB of shared
# memory (< 227 KB).
# sm_80: 128x128x32, 8 warps, 3 stages: the 4-warp version spills with the LoRA epilogue.
_GEMM_LARGE = {90: TileConfig(128, 256, 64, 8, 3), 80: TileConfig(128, 128, 32, 8, 3)}
# dX with dropout: the LoRA product cannot accumulate into the GEMM's accumulator (the mask
# applies to it alone), so a second fp32 tile and the mask live beside it. Measured with
# ptxas (fastpeft check, sm_90, 8 warps, bf16 with fp32 or bf16 adapters, ranks 16 / 64): as
# an epilogue after the main loop, 128x128 takes 196-226 registers against 115-128 without
# dropout, and 128x256 spills 2.9-3.1 KB. The kernel now forms the masked term before the main
# loop, as its starting accumulator (nothing of it stays live across the loop): 128x128 takes
# 156-176 registers, 128x256 still spills 64-200 B at 255 -- the keep mask is built in
# Philox's [BLOCK_M, BLOCK_K / 4] x 4 layout and converted to the accumulator's, so its
# 128 values a thread are materialized beside the 128-register product. So the output tile
# stays halved on sm_90 (128x256 needs the mask drawn in the accumulator's own layout), and on
# sm_80 64x128 (128x128x32 spills).
_DX_DROPOUT_LARGE = {90: TileConfig(128, 128, 64, 8, 3), 80: TileConfig(64, 128, 64, 8, 4)}
# DoRA's forward epilogue (``HAS_SCALE``: the unscaled tile stored as u, then the per-column
# scale) beside the accumulator: on sm_90 the 128x256 tile spills 4-32 B at 255 registers
# (fastpeft check, ranks 16-64, bf16 / fp16 with fp32 or 16-bit adapters), so the output tile
# halves there, as dX's with dropout; sm_80's 128x128 compiles without spills.
_SCALED_LARGE = {90: TileConfig(128, 128, 64, 8, 3), 80: _GEMM_LARGE[80]}
# The opt-in sm_90 forward with TMA loads and a persistent grid (``lora_fwd_tma_kernel``,
# ``FASTPEFT_LORA_TMA``) runs on _GEMM_LARGE[90], the tile its pointer-load twin runs, so the
# GPU timing compares the main loops and not two tiles. Programs per SM: 1, because 3 stages
# of 48 KB fill 144 of the 227 KB of shared memory, so a second program could not be resident
# beside the first and would only queue behind it.
TMA_PROGRAMS_PER_SM = 1
# Environment variable that opts in to the TMA forward (read at every call, like
# FASTPEFT_BACKEND, so a benchmark can time both kernels in one process): "1" on, else off.
# A dispatch table written from a GPU run that timed it may also choose it ("fused-tma").
TMA_ENV = "FASTPEFT_LORA_TMA"
# Medium M: 64-row tiles double the programs; 4 stages of (64+128)x64 bf16 = 96 KB.
# sm_90: 4 warps, one warpgroup owning all 64 rows, so the wgmma is m64n128 (with 8 warps
# Triton gives each of two warpgroups half the columns: m64n64, half the work per
# instruction). sm_80: 8 warps (4 spill with rank 64).
_GEMM_MEDIUM = {90: TileConfig(64, 128, 64, 4, 4), 80: TileConfig(64, 128, 64, 8, 4)}
# Decode: 16 rows; BLOCK_K 128 gives 16 KB-per-stage W streams, 3 stages deep to keep
# bytes in flight per SM for a bandwidth-bound loop (4 stages spill the dX kernel at rank
# 64 on sm_90). Keyed by BLOCK_N.
_GEMM_DECODE = {64: TileConfig(16, 64, 128, 4, 3), 32: TileConfig(16, 32, 128, 4, 3)}

# Shrink (s = x_hat A^T; also dS = dY B), fp32 operands, 4 warps, 3 stages: 64 rows x 128
# columns of x per step, 64 columns for rank 64 (the 128-wide step spills on sm_80 there); decode
# tiles take 16 rows.
_SHRINK = {16: TileConfig(64, 0, 128, 4, 3), 32: TileConfig(64, 0, 128, 4, 3), 64: TileConfig(64, 0, 64, 4, 3)}
_SHRINK_DECODE = TileConfig(16, 0, 128, 4, 3)
# dA = dS^T x_hat and dB = scaling dY^T s: a program owns 128 columns of x (dY) and loops
# over 64-row steps of its row range with the [rank, 128] fp32 sum in registers; 8 warps
# (4 spill at rank 64 with dropout on sm_80: the sum, the widened x tile and the mask);
# 3 stages of 64 x 128 16-bit + 64 x 64 fp32 tiles = 96 KB.
_WGRAD = TileConfig(64, 128, 0, 8, 3)
# Partial-sum kernel (dS, dA, dB): 1024 elements a program, 4 warps of 32 threads with 8 fp32
# each; no loop worth pipelining (a few partials), so one stage.
_REDUCE = TileConfig(1024, 0, 0, 4, 1)
# Epilogue of a split-K GEMM (sum of the fp32 partials, LoRA term, bias or dropout): 64 x 128
# output tiles, 8 warps (4 spill on sm_80 with the dropout mask at rank 64), partial loads
# double-buffered (2 x 32 KB of shared memory).
_SPLIT_EPILOGUE = TileConfig(64, 128, 0, 8, 2)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def block_r(rank: int) -> int:
    """The padded rank tile for ``rank`` (1 <= rank <= MAX_RANK)."""
    return max(MIN_BLOCK_R, 1 << (rank - 1).bit_length())


@lru_cache(maxsize=None)
def _device_props(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major * 10 + props.minor


def device_info(device: torch.device) -> tuple[int, int]:
    """(SM count, compute capability as 80/90/...) of ``device``; fixed values in the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_SMS, 90
    return _device_props(device.index if device.index is not None else torch.cuda.current_device())


def _arch_key(capability: int) -> int:
    """Hopper (sm_90) tables for sm_90 and newer, Ampere (sm_80) tables below."""
    return 90 if capability >= 90 else 80


def gemm_tile(m: int, capability: int, n: int, num_sms: int, dropout_epilogue: bool = False,
              scaled_epilogue: bool = False) -> TileConfig:
    """The base-GEMM tile for ``m`` rows and ``n`` output columns (N forward, K for dX).

    ``dropout_epilogue``: the dX kernel's epilogue applies the dropout mask;
    ``scaled_epilogue``: the forward's epilogue is DoRA's (``HAS_SCALE``).
    """
    if m <= DECODE_MAX_M:
        wide = _GEMM_DECODE[64]
        # The narrow tile spills with the dropout epilogue at rank 64 on sm_90.
        narrow_ok = cdiv(n, wide.block_n) < num_sms and not dropout_epilogue
        return _GEMM_DECODE[32] if narrow_ok else wide
    if m <= MEDIUM_MAX_M:
        return _GEMM_MEDIUM[_arch_key(capability)]
    table = _DX_DROPOUT_LARGE if dropout_epilogue else _SCALED_LARGE if scaled_epilogue else _GEMM_LARGE
    return table[_arch_key(capability)]


def may_fuse_shrink(gemm: TileConfig, r_block: int, a_bytes: int, w_bytes: int) -> bool:
    """Whether ``plan_forward`` may compute s inside the GEMM tile ``gemm``: an s tile of at
    most MAX_FUSED_S_TILE elements, and on decode tiles at most as many bytes of A as of W per
    program (each program re-reads all of A, ``r_block`` rows of ``a_bytes`` elements, beside
    its ``block_n`` rows of W of ``w_bytes``: an fp32 A at rank 32 would double a 64-wide
    bf16 tile's reads)."""
    if gemm.block_m * r_block > MAX_FUSED_S_TILE:
        return False
    return gemm.block_m > DECODE_MAX_M or r_block * a_bytes <= gemm.block_n * w_bytes


@dataclass(frozen=True)
class Split:
    """A reduction cut into ``count`` consecutive ranges of ``length`` elements (the last one
    possibly shorter), one per program; their partial sums are added in a fixed order."""

    count: int
    length: int


def split_reduction(size: int, step: int, max_splits: int, min_steps: int) -> Split:
    """Cut a reduction of ``size`` elements, walked ``step`` at a time, into at most
    ``max_splits`` ranges of at least ``min_steps`` steps each (one range if neither allows
    more); every range but the last has the same number of steps."""
    steps = cdiv(size, step)
    count = max(1, min(steps // min_steps, max_splits))
    per_split = cdiv(steps, count)
    return Split(cdiv(steps, per_split), per_split * step)


def gemm_split(m: int, n: int, red: int, tile: TileConfig, num_sms: int) -> Split:
    """Split-K of a GEMM with an ``m x n`` output and a reduction of ``red``, on ``tile``.

    The rule: as many splits as fit in one wave (output tiles x splits <= SMs), at least
    MIN_STEPS_PER_SPLIT steps each. A grid of fewer tiles than SMs leaves the rest idle
    (M = 17-64 with N = 4096 is 32 tiles of 64 x 128 on 132 SMs); more splits than one wave
    holds would only start a second wave, taking as long as the first. So grids of at least
    half a wave are never split, and smaller ones are split up to ~1 wave."""
    tiles = cdiv(m, tile.block_m) * cdiv(n, tile.block_n)
    return split_reduction(red, tile.block_k, num_sms // tiles, MIN_STEPS_PER_SPLIT)


def _rank_pass_split(parallel_tiles: int, size: int, step: int, num_sms: int, min_steps: int) -> Split:
    """Split of a bandwidth-bound rank-r pass with ``parallel_tiles`` independent tiles:
    enough splits for PROGRAMS_PER_SM programs per SM."""
    return split_reduction(size, step, cdiv(PROGRAMS_PER_SM * num_sms, parallel_tiles), min_steps)


@dataclass(frozen=True)
class ForwardPlan:
    """How the forward runs: the GEMM tile and its split-K, and either a shrink fused into
    the GEMM or a separate, K-split shrink kernel."""

    gemm: TileConfig
    gemm_split: Split
    fuse_shrink: bool
    shrink: TileConfig
    shrink_split: Split  # ignored when fused
    tma: bool = False  # the GEMM is lora_fwd_tma_kernel (persistent, TMA loads), on ``gemm``


def tma_requested() -> bool:
    """Whether ``FASTPEFT_LORA_TMA=1`` asks for the TMA forward (read at every call)."""
    return os.environ.get(TMA_ENV, "0") == "1"


def plan_forward(m: int, n: int, k: int, rank: int, dropout: bool, device: torch.device, *, a_bytes: int,
                 w_bytes: int, tma: bool = False, scaled: bool = False) -> ForwardPlan:
    """Choose the forward kernels for x ``[m, k]``, W ``[n, k]`` (``w_bytes`` an element) and
    rank ``rank`` (A's elements ``a_bytes``); ``scaled``: with DoRA's epilogue (its tiles:
    ``gemm_tile``'s ``scaled_epilogue``; never the TMA forward, whose tile is the large one).

    ``tma``: the TMA forward is asked for and x and W qualify for its descriptors; it then runs
    wherever the plan is sm_90's large tile without split-K, always with the separate shrink
    (the TMA kernel has no fused shrink: A's pointer loads and the s tile would sit beside
    the descriptors' pipeline in a kernel no GPU has timed yet)."""
    num_sms, capability = device_info(device)
    r_block = block_r(rank)
    gemm = gemm_tile(m, capability, n, num_sms, scaled_epilogue=scaled)
    split = gemm_split(m, n, k, gemm, num_sms)
    tma = tma and _arch_key(capability) == 90 and gemm == tma_tile() and split.count == 1
    if tma or dropout or split.count > 1 or not may_fuse_shrink(gemm, r_block, a_bytes, w_bytes):
        # With dropout the mask must be drawn once per element, not per column tile; a
        # split-K GEMM has only part of K for its s.
        fuse = False
    elif m <= DECODE_MAX_M:
        fuse = True
    else:
        fuse = r_block * n < FLOPS_PER_BYTE * gemm.block_n
    shrink = _SHRINK_DECODE if m <= DECODE_MAX_M else _SHRINK[r_block]
    shrink_split = _rank_pass_split(cdiv(m, shrink.block_m), k, shrink.block_k, num_sms, MIN_STEPS_PER_SPLIT)
    return ForwardPlan(gemm, split, fuse, shrink, shrink_split, tma)


@dataclass(frozen=True)
class BackwardPlan:
    """Tiles and splits of the backward kernels."""

    ds: TileConfig  # dS = scaling dY B: the shrink kernel on dY, split over N
    ds_split: Split
    dx: TileConfig  # dX = dY W + LoRA term: the GEMM tile, split-K over N
    dx_split: Split
    wgrad: TileConfig  # dA over x's columns, dB over dY's: split over M
    da_split: Split
    db_split: Split


def plan_backward(m: int, n: int, k: int, rank: int, dropout: bool, device: torch.device) -> BackwardPlan:
    """Choose the backward kernels for dY ``[m, n]``, x ``[m, k]`` and rank ``rank``."""
    num_sms, capability = device_info(device)
    ds = _SHRINK_DECODE if m <= DECODE_MAX_M else _SHRINK[block_r(rank)]
    ds_split = _rank_pass_split(cdiv(m, ds.block_m), n, ds.block_k, num_sms, MIN_STEPS_PER_SPLIT)
    dx = gemm_tile(m, capability, k, num_sms, dropout_epilogue=dropout)
    # Every split of dA / dB is a full row tile per step; one step already pays for its
    # partial (a [rank, 128] fp32 tile against 64 x 128 elements read per step).
    da_split = _rank_pass_split(cdiv(k, _WGRAD.block_n), m, _WGRAD.block_m, num_sms, 1)
    db_split = _rank_pass_split(cdiv(n, _WGRAD.block_n), m, _WGRAD.block_m, num_sms, 1)
    return BackwardPlan(ds, ds_split, dx, gemm_split(m, k, n, dx, num_sms), _WGRAD, da_split, db_split)


def aligned_rows(t: torch.Tensor, row_strides: bool = True) -> bool:
    """``t`` (viewed as rows of its last dimension) launches as the checked variant: inner
    stride 1, row strides multiples of ALIGN elements (unless not ``row_strides``: B and the
    bias, whose row stride is exempt from specialization or absent), data at a multiple of
    ALIGN bytes, sizes, strides and the row count within i32. Dimensions of size 1 are
    skipped: their strides are never used (the launchers pass canonical ones)."""
    used = [(size, stride) for size, stride in zip(t.shape, t.stride()) if size > 1]
    if any(size >= _I32_LIMIT or abs(stride) >= _I32_LIMIT for size, stride in used):
        return False
    if math.prod(t.shape[:-1]) >= _I32_LIMIT:
        return False
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    rows = [stride for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1]
    if row_strides and any(stride % ALIGN for stride in rows):
        return False
    return t.storage_offset() * t.element_size() % ALIGN == 0


def aligned_for_kernels(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a problem's big operands launch the specialization ``fastpeft check`` compiles.

    Triton specializes integer arguments on divisibility by 16 (and on being 1) and pointers
    on 16-byte alignment. The kernels exempt the arguments whose values are arbitrary (M, the
    rank, B's row stride, split counts, the dropout threshold: ``do_not_specialize``), so the
    remaining ones must hold: K and N multiples of 16 (they also bound the masked loads along
    the contiguous dimension), x ``[..., K]`` and W ``[N, K]`` with unit inner strides, row
    strides that are multiples of 16 elements and 16-byte aligned data (judged from the
    storage offset: torch's allocations are aligned, and fake tensors have no data pointer),
    every size and stride within i32. The small operands (A, B, the bias) and the gradient dY
    are made to comply by the launchers (a copy, when one does not), and the kernels' own
    buffers are fresh allocations.
    """
    k, n = x.shape[-1], weight.shape[0]
    return k % ALIGN == 0 and n % ALIGN == 0 and aligned_rows(x) and aligned_rows(weight)


def kernel_friendly(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the LoRA op may send x ``[..., K]`` and W ``[N, K]`` to the Triton kernels as
    far as alignment goes (``aligned_for_kernels``); the torch path takes the others. Always
    true off CUDA: only Triton's interpreter runs CPU tensors, it compiles nothing, so there
    are no specializations to miss, and the tests keep their odd shapes (the kernels are
    correct for every shape; unaligned ones are just not compiled ahead of time). Depends on
    x and W only, so the forward and the backward of a call decide alike."""
    return x.device.type != "cuda" or aligned_for_kernels(x, weight)


def gemm_tile_choices() -> list[tuple[TileConfig, int | None, bool]]:
    """Every base-GEMM tile ``gemm_tile`` can return, as (tile, arch family or None for
    all, whether the dX kernel uses it with a dropout epilogue), without repeats."""
    everywhere = [(tile, None, drop) for tile in (_GEMM_DECODE[64],) for drop in (False, True)]
    everywhere.append((_GEMM_DECODE[32], None, False))
    per_family = [
        (table[family], family, drop)
        for family in (80, 90)
        for table, drop in (
            (_GEMM_LARGE, False), (_DX_DROPOUT_LARGE, True), (_GEMM_MEDIUM, False), (_GEMM_MEDIUM, True),
        )
        if (table[family], None, drop) not in everywhere
    ]
    return list(dict.fromkeys(per_family + everywhere))


def scaled_forward_tiles() -> list[tuple[TileConfig, int | None]]:
    """Every base-GEMM tile the forward with DoRA's epilogue can run on, with its arch family
    (None: all), without repeats."""
    per_family = [(table[family], family) for family in (80, 90) for table in (_SCALED_LARGE, _GEMM_MEDIUM)]
    return list(dict.fromkeys(per_family + [(_GEMM_DECODE[64], None), (_GEMM_DECODE[32], None)]))


def shrink_tile_choices() -> list[tuple[TileConfig, int]]:
    """Every (shrink tile, padded rank) ``plan_forward`` and ``plan_backward`` can produce."""
    return [(tile, r) for r, tile in _SHRINK.items()] + [(_SHRINK_DECODE, r) for r in BLOCK_R_CHOICES]


def tma_tile() -> TileConfig:
    """The tile of the opt-in TMA forward (``plan_forward(tma=True)``), sm_90 only."""
    return _GEMM_LARGE[90]


def wgrad_tile() -> TileConfig:
    """The tile of the dA / dB kernel."""
    return _WGRAD


def split_epilogue_tile() -> TileConfig:
    """The tile of the split-K GEMMs' epilogue kernels."""
    return _SPLIT_EPILOGUE


def reduce_tile() -> TileConfig:
    """The tile of the partial-sum kernel (``block_m`` elements a program)."""
    return _REDUCE
