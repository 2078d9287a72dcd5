"""Which kernel configuration the LoRA launchers use for a given problem.

Every configuration returned here is listed by ``lora_kernel_specs`` so ``fastpeft check``
compiles it ahead of time for sm_80 and sm_90. The tables are starting points chosen from
the shapes of the problem (rationale beside each constant); they have not yet been tuned
on a GPU (see bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from fastpeft.backend import interpreting

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

# Programs per SM to aim for when splitting reductions: 2 hides one program's latency
# behind another's without making the partial buffers large.
PROGRAMS_PER_SM = 2

# SM count assumed under the Triton interpreter (no GPU): small, so that tests exercise
# the split paths on small shapes.
INTERPRETER_SMS = 4


@dataclass(frozen=True)
class TileConfig:
    """Tile of a GEMM-like kernel: BLOCK_M rows x BLOCK_N output columns, BLOCK_K reduction."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Base-GEMM tiles (forward y = x W^T, backward dX = dY W) per regime and architecture.
# Every entry compiles without register spills (fastpeft check); none is tuned on a GPU yet.
# sm_90: 128x256x64, 8 warps (two warpgroups) is the wgmma tile of Triton's Hopper matmul
# examples; 3 stages of (128+256)x64 bf16 = 144 KB of shared memory (< 227 KB).
# sm_80: 128x128x32, 8 warps, 3 stages: the 4-warp version spills with the LoRA epilogue.
_GEMM_LARGE = {90: TileConfig(128, 256, 64, 8, 3), 80: TileConfig(128, 128, 32, 8, 3)}
# dX with dropout: the mask and the separate LoRA product double the epilogue's live
# registers, so the output tile is halved (128x256 spills on sm_90, 128x128x32 on sm_80).
_DX_DROPOUT_LARGE = {90: TileConfig(128, 128, 64, 8, 3), 80: TileConfig(64, 128, 64, 8, 4)}
# Medium M: 64-row tiles double the programs; 4 stages of (64+128)x64 bf16 = 96 KB; 8 warps
# (4 spill with rank 64 on sm_80).
_GEMM_MEDIUM = TileConfig(64, 128, 64, 8, 4)
# Decode: 16 rows; BLOCK_K 128 gives 16 KB-per-stage W streams, 3 stages deep to keep
# bytes in flight per SM for a bandwidth-bound loop (4 stages spill the dX kernel at rank
# 64 on sm_90). Keyed by BLOCK_N.
_GEMM_DECODE = {64: TileConfig(16, 64, 128, 4, 3), 32: TileConfig(16, 32, 128, 4, 3)}

# Shrink (s = x_hat A^T), 4 warps, 3 stages: 64 rows x 128 columns of x per step, 64
# columns for rank 64 (the 128-wide step spills on sm_80 there); decode tiles take 16 rows.
_SHRINK = {16: TileConfig(64, 0, 128, 4, 3), 32: TileConfig(64, 0, 128, 4, 3), 64: TileConfig(64, 0, 64, 4, 3)}
_SHRINK_DECODE = TileConfig(16, 0, 128, 4, 3)
# Backward pass over dY: 64 rows x 64 columns of dY per step (16 rows when decoding).
_DY_PASS = TileConfig(64, 64, 0, 4, 3)
_DY_PASS_DECODE = TileConfig(16, 64, 0, 4, 3)
# dA = dS^T x_hat: one 64 x 128 tile of x per program, no loop (no pipelining stages).
_DA = TileConfig(64, 128, 0, 4, 1)


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


def gemm_tile(m: int, capability: int, n: int, num_sms: int, dropout_epilogue: bool = False) -> TileConfig:
    """The base-GEMM tile for ``m`` rows and ``n`` output columns (N forward, K for dX).

    ``dropout_epilogue``: the dX kernel's epilogue applies the dropout mask.
    """
    if m <= DECODE_MAX_M:
        wide = _GEMM_DECODE[64]
        # The narrow tile spills with the dropout epilogue at rank 64 on sm_90.
        narrow_ok = cdiv(n, wide.block_n) < num_sms and not dropout_epilogue
        return _GEMM_DECODE[32] if narrow_ok else wide
    if m <= MEDIUM_MAX_M:
        return _GEMM_MEDIUM
    table = _DX_DROPOUT_LARGE if dropout_epilogue else _GEMM_LARGE
    return table[_arch_key(capability)]


def may_fuse_shrink(gemm: TileConfig, r_block: int) -> bool:
    """Whether ``plan_forward`` may compute s inside the GEMM tile ``gemm`` (decode tiles
    re-read A from L2 per program, at most as many bytes as their slab of W)."""
    return gemm.block_m > DECODE_MAX_M or r_block <= gemm.block_n


@dataclass(frozen=True)
class ForwardPlan:
    """How the forward runs: the GEMM tile, and either a fused shrink or a split shrink."""

    gemm: TileConfig
    fuse_shrink: bool
    shrink: TileConfig
    shrink_splits: int  # K-splits of the shrink kernel (ignored when fused)
    k_per_split: int


def plan_forward(m: int, n: int, k: int, rank: int, dropout: bool, device: torch.device) -> ForwardPlan:
    """Choose the forward kernels for x ``[m, k]``, W ``[n, k]`` and rank ``rank``."""
    num_sms, capability = device_info(device)
    r_block = block_r(rank)
    gemm = gemm_tile(m, capability, n, num_sms)
    if dropout or not may_fuse_shrink(gemm, r_block):
        fuse = False  # with dropout the mask must be drawn once per element, not per column tile
    elif m <= DECODE_MAX_M:
        fuse = True
    else:
        fuse = r_block * n < FLOPS_PER_BYTE * gemm.block_n
    shrink = _SHRINK_DECODE if m <= DECODE_MAX_M else _SHRINK[r_block]
    row_tiles = cdiv(m, shrink.block_m)
    k_steps = cdiv(k, shrink.block_k)
    splits = max(1, min(k_steps, cdiv(PROGRAMS_PER_SM * num_sms, row_tiles)))
    steps_per_split = cdiv(k_steps, splits)
    splits = cdiv(k_steps, steps_per_split)
    return ForwardPlan(gemm, fuse, shrink, splits, steps_per_split * shrink.block_k)


@dataclass(frozen=True)
class BackwardPlan:
    """Tiles of the backward kernels and the column split of the pass over dY."""

    dy_pass: TileConfig
    split_n: int
    dx: TileConfig
    da: TileConfig


def plan_backward(m: int, n: int, k: int, rank: int, dropout: bool, device: torch.device) -> BackwardPlan:
    """Choose the backward kernels for dY ``[m, n]``, x ``[m, k]`` and rank ``rank``."""
    num_sms, capability = device_info(device)
    dy_pass = _DY_PASS_DECODE if m <= DECODE_MAX_M else _DY_PASS
    row_tiles = cdiv(m, dy_pass.block_m)
    split_n = max(1, min(cdiv(n, dy_pass.block_n), cdiv(PROGRAMS_PER_SM * num_sms, row_tiles)))
    dx = gemm_tile(m, capability, k, num_sms, dropout_epilogue=dropout)
    return BackwardPlan(dy_pass, split_n, dx, _DA)


def gemm_tile_choices() -> list[tuple[TileConfig, int | None, bool]]:
    """Every base-GEMM tile ``gemm_tile`` can return, as (tile, arch family or None for
    all, whether the dX kernel uses it with a dropout epilogue)."""
    everywhere = [(tile, None, drop) for tile in (_GEMM_MEDIUM, _GEMM_DECODE[64]) for drop in (False, True)]
    everywhere.append((_GEMM_DECODE[32], None, False))
    per_family = [
        (table[family], family, drop)
        for family in (80, 90)
        for table, drop in ((_GEMM_LARGE, False), (_DX_DROPOUT_LARGE, True))
        if (table[family], None, drop) not in everywhere
    ]
    return per_family + everywhere


def shrink_tile_choices() -> list[tuple[TileConfig, int]]:
    """Every (shrink tile, padded rank) ``plan_forward`` can produce."""
    return [(tile, r) for r, tile in _SHRINK.items()] + [(_SHRINK_DECODE, r) for r in BLOCK_R_CHOICES]


def dy_pass_tile_choices() -> list[TileConfig]:
    """Every tile of the backward pass over dY (``plan_backward``)."""
    return [_DY_PASS, _DY_PASS_DECODE]


def da_tile() -> TileConfig:
    """The tile of the dA kernel."""
    return _DA
