"""Which tiles the bottleneck adapter's launchers use for a given problem.

Every configuration returned here is listed by ``bottleneck_kernel_specs`` so ``fastpeft check``
compiles it ahead of time for sm_80 and sm_90 (0 bytes of register spills, shared memory
within the limit, no fences). The tables are starting points chosen from the shapes of the
problem (rationale beside each constant); they have not been tuned on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpeft.kernels.lora.configs import ALIGN, aligned_rows, block_r, cdiv, device_info

# Bottleneck sizes the Triton kernels take: the rank tile is padded to a power of two >= 16
# (tl.dot needs every dimension >= 16), up to 256 (AdapterHub's default reduction factor 16 on
# a 4096-wide model).
MAX_RANK = 256
BLOCK_R_CHOICES = (16, 32, 64, 128, 256)
# The widest rank tile of the backward's column kernel. At 256 its two fp32 weight-gradient
# sums alone ([BLOCK_D, 256] and [256, BLOCK_D]) spill on every tile tried (16 x 16 with 8
# warps: 120-1400 B; 16 warps cap registers at 128 and spill KBs; fastpeft check), so wider
# bottlenecks run it once per 128-rank chunk (a third grid axis; each chunk re-reads its g and
# h tiles) and form dh in a kernel of its own (``bottleneck_bwd_dh_kernel``), which walks the
# rank in steps.
COLUMN_MAX_RANK = 128

# Up to this many rows the call is a decode step: 16-row tiles (the smallest tl.dot), so
# that the few rows do not pay for a larger tile's padding.
DECODE_MAX_M = 16

# Programs per SM to aim for when splitting the backward's column pass over rows: 2 hides
# one program's latency behind another's while keeping the fp32 partials few (each split
# adds one [D, R] partial per weight gradient, summed by the launcher).
PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class Tile:
    """``BLOCK_M`` rows x ``BLOCK_D`` columns of h per step, with launch options."""

    block_m: int
    block_d: int
    num_warps: int
    num_stages: int


# Row-block kernels (forward; backward dz), keyed by the rank tile: a program owns BLOCK_M
# rows and walks D in BLOCK_D steps, with the fp32 [BLOCK_M, BLOCK_R] bottleneck tile live
# throughout. 32 rows keep twice as many programs in flight as 64 on a memory-bound pass
# (M = 8192 gives 256 programs, ~2 per SM on 132 SMs); the step shrinks as the rank tile
# grows so that the W tile of a step ([BLOCK_R, BLOCK_D] fp32 after widening) stays at
# 8-16 KB. 4 warps, 3 stages (the loads of the next steps in flight). At rank 128, 32 rows
# spill the dz kernel (48-88 B, fastpeft check): 16 rows.
_ROW_TILES = {
    16: Tile(32, 128, 4, 3),
    32: Tile(32, 128, 4, 3),
    64: Tile(32, 64, 4, 3),
    128: Tile(16, 32, 4, 3),
    # 8 warps halve each thread's share of the [16, 256] fp32 tiles (z, a, dA, dz): with 4 the
    # dz kernel reaches 255 registers; 2 stages keep the forward's shared memory at 51 KB
    # (3: 84 KB) with 0 spills either way (fastpeft check).
    256: Tile(16, 32, 8, 2),
}
# Decode: 16 rows (M <= 16 fits one program), same steps.
_ROW_TILES_DECODE = {r: Tile(16, t.block_d, t.num_warps, t.num_stages) for r, t in _ROW_TILES.items()}

# Column kernel of the backward (dW_up, db_up, dW_down, dh), keyed by the rank tile: a program
# owns BLOCK_D columns and walks its rows BLOCK_M at a time, with the fp32 sums
# [BLOCK_D, BLOCK_R] (dW_up) and [BLOCK_R, BLOCK_D] (dW_down), the W_down tile and four
# [BLOCK_M, BLOCK_D] tiles (g, h, the mask, dh) live at once. 32 rows and at most 2 stages:
# 64 rows or 3 stages spill 12-560 B with dropout and dh (fastpeft check). Ranks 32 and 128
# need 8 warps and a single stage (2 stages spill 8-168 B with fp16 weights, dropout and dh);
# rank 64 fits 2 stages with 8 warps; rank 128 also takes 16 rows and 32 columns. Every entry
# reaches up to 255 registers with 0 spills on sm_80 and sm_90.
_COLUMN_TILES = {
    16: Tile(32, 64, 4, 2),
    32: Tile(32, 64, 8, 1),
    64: Tile(32, 64, 8, 2),
    128: Tile(16, 32, 8, 1),
}


# dh kernel of the backward for bottlenecks above COLUMN_MAX_RANK: a [BLOCK_M, BLOCK_D] tile of
# dz W_down per program, the rank walked DH_RANK_STEP at a time. A GEMM tile of a memory-bound
# pass (dz, fp32 [M, R], and W_down are read, dh written): 64 x 64 with 4 warps keeps a 32-
# register fp32 accumulator per thread; 2 stages overlap the next rank step's loads.
DH_TILE = Tile(64, 64, 4, 2)
DH_RANK_STEP = 32


@dataclass(frozen=True)
class Plan:
    """Tiles of one call: ``rows`` for the row-block kernels (rank tile ``block_r``),
    ``columns`` for the backward's column kernel (rank tile ``column_r``, run for
    ``rank_chunks`` chunks) with its ``splits`` row ranges of ``rows_per_split`` rows each;
    with more than one chunk dh comes from the dh kernel (``DH_TILE``)."""

    block_r: int
    rows: Tile
    columns: Tile
    splits: int
    rows_per_split: int
    column_r: int
    rank_chunks: int


def row_tile(m: int, r_block: int) -> Tile:
    """The row-block kernels' tile for ``m`` rows and rank tile ``r_block``."""
    return (_ROW_TILES_DECODE if m <= DECODE_MAX_M else _ROW_TILES)[r_block]


def plan(m: int, d: int, rank: int, device: torch.device) -> Plan:
    """The tiles for ``h [m, d]`` and bottleneck ``rank`` (1 <= rank <= MAX_RANK) on ``device``."""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"bottleneck kernels take 1 <= R <= {MAX_RANK}, got R={rank}")
    num_sms, _ = device_info(device)
    r_block = block_r(rank)
    column_r = min(r_block, COLUMN_MAX_RANK)
    chunks = cdiv(rank, column_r)
    columns = _COLUMN_TILES[column_r]
    row_blocks = cdiv(m, columns.block_m)
    wanted = max(1, cdiv(PROGRAMS_PER_SM * num_sms, cdiv(d, columns.block_d) * chunks))
    per_split = cdiv(row_blocks, min(wanted, row_blocks)) * columns.block_m
    return Plan(r_block, row_tile(m, r_block), columns, cdiv(m, per_split), per_split, column_r, chunks)


def tile_choices() -> list[tuple[str, int, Tile]]:
    """Every ``(kernel kind, rank tile, tile)`` the planner can return: kind "rows",
    "columns" or "dh" (for ``bottleneck_kernel_specs``)."""
    rows = {(r, t) for table in (_ROW_TILES, _ROW_TILES_DECODE) for r, t in table.items()}
    return ([("rows", r, t) for r, t in sorted(rows, key=str)] + [("columns", r, t) for r, t in _COLUMN_TILES.items()]
            + [("dh", DH_RANK_STEP, DH_TILE)])


def kernel_friendly(h: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether h ``[..., D]`` (and a separate residual) launch the specialization ``fastpeft
    check`` compiles: on CUDA, D a multiple of 16, unit inner strides, row strides multiples of
    16 elements, 16-byte aligned data (``lora.configs.aligned_rows``); the op sends the others
    to the torch path. The launchers make the small operands (weights, biases) and dOut comply
    (a copy when one does not). Always true off CUDA: the interpreter compiles nothing."""
    if h.device.type != "cuda":
        return True
    return h.shape[-1] % ALIGN == 0 and aligned_rows(h) and (residual is None or aligned_rows(residual))
