"""Which tiles the bottleneck adapter's launchers use for a given problem.

Every configuration returned here is listed by ``bottleneck_kernel_specs`` so ``fastpeft check``
compiles it ahead of time for sm_80 and sm_90 (0 bytes of register spills, shared memory
within the limit, no fences). The tables are starting points chosen from the shapes of the
problem (rationale beside each constant); they have not been tuned on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpeft.kernels.lora.configs import ALIGN, Split, aligned_rows, block_r, cdiv, device_info, wgrad_tile

# Bottleneck sizes the Triton kernels take: the rank tile is padded to a power of two >= 16
# (tl.dot needs every dimension >= 16), up to 256 (AdapterHub's default reduction factor 16 on
# a 4096-wide model).
MAX_RANK = 256
BLOCK_R_CHOICES = (16, 32, 64, 128, 256)
# The widest rank tile of the backward's column kernel, which keeps two fp32 weight-gradient
# sums ([BLOCK_D, R] and [R, BLOCK_D]) in registers and so narrows its column tile as R grows:
# 64 columns up to rank 64, 32 at 128 (16 rows), and at 256 every tile spills (16 x 16 with 8
# warps: 120-1400 B; fastpeft check). Each column tile re-reads dz and act(z) (fp32 [M, R]):
# at R = 128 that is 1.1 GB at M = 8192, D = 4096 (128 column tiles). Wider bottlenecks run
# the weight gradients as two GEMMs instead (``lora_bwd_wgrad_kernel``: dW_down = dz^T h_hat,
# dW_up = act(z)^T dOut, one fp32 sum each, [128 ranks, 128 columns] tiles: dz and act(z)
# re-read per 128 columns, h and dOut once: 0.4 GB there), db_up as a column sum of
# dOut, and dh in a kernel of its own (``bottleneck_bwd_dh_kernel``).
COLUMN_MAX_RANK = 64
# Ranks a program of the wide weight-gradient GEMMs owns (their grid's third axis), on the
# LoRA weight gradient's 64 x 128 tile (``lora.configs.wgrad_tile``): the [128, 128] fp32 sum
# is 64 registers a thread at 8 warps (128-171 registers in all, 0 spills; 128 KB of shared
# memory at 3 stages on sm_80, 160 KB on sm_90: fastpeft check).
WIDE_RANK_BLOCK = 128

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


# Row-block kernel of the backward (dz = the shrink of dOut against W_up^T, then the
# activation's derivative), keyed by the rank tile: a program owns BLOCK_M rows and walks D in
# BLOCK_D steps, with the fp32 [BLOCK_M, BLOCK_R] bottleneck tile live throughout. 32 rows
# keep twice as many programs in flight as 64 on a memory-bound pass (M = 8192 gives 256
# programs, ~2 per SM on 132 SMs); the step shrinks as the rank tile grows so that the W tile
# of a step ([BLOCK_R, BLOCK_D] fp32 after widening) stays at 8-16 KB. 4 warps, 3 stages (the
# loads of the next steps in flight). Rank 128 takes 8 warps (with 4, 32 rows spill 48-88 B:
# fastpeft check; with 8: 177-192 registers, 0 spills; 64 rows spill 56-144 B even with 8, the
# epilogue's fp32 z, act(z), dA and dz tiles live together), and wider bottlenecks run as rank
# blocks of DOWN_MAX_RANK_BLOCK, as the down projection does: 16-row tiles of all 256 ranks
# re-read W_up once per 16 rows (1.2 GB of L2 reads at M = 8192, D = 4096, bf16), 32-row
# blocks of 128 ranks half as often, each block re-reading its rows of dOut from L2. At decode
# it takes the down projection's decode tile and split (``_row_pass``).
_ROW_TILES = {
    16: Tile(32, 128, 4, 3),
    32: Tile(32, 128, 4, 3),
    64: Tile(32, 64, 4, 3),
    128: Tile(32, 32, 8, 3),
}

# --- The forward: a down projection, then an up projection in GEMM-shaped tiles ------------
# Down projection (``bottleneck_down_kernel``), keyed by the rank block: BLOCK_M rows x a
# block of up to DOWN_MAX_RANK_BLOCK ranks, D walked BLOCK_D at a time; W_down is re-read
# once per row tile, so the row tile is as tall as the fp32 [BLOCK_M, BLOCK_R] sum allows: 64
# rows cut the re-reads 4x against the old 16-row tiles. The step keeps a stage's W tile at
# 8-16 KB; 8 warps from rank 64 up (4 spill 0.4-1.8 KB there: fastpeft check), 0 spills at
# 180-255 registers.
_DOWN_TILES = {
    16: Tile(64, 64, 4, 3),
    32: Tile(64, 64, 4, 3),
    64: Tile(64, 64, 8, 3),
    128: Tile(64, 32, 8, 3),
}
# A 64 x 256 fp32 sum spills with 8 warps (0.2-0.5 KB) and with 16 (capped at 128 registers),
# so wider bottlenecks run as rank blocks of 128: each re-reads its row tile's h, from L2 (the
# blocks of a row tile are consecutive programs).
DOWN_MAX_RANK_BLOCK = 128
# Decode (M <= DECODE_MAX_M): one 16-row tile holds every row, so the work is spread over
# D (a split, partials summed by ``bottleneck_down_sum_kernel``) and over blocks of
# DECODE_RANK_BLOCK ranks (a grid axis: each block re-reads the few rows of h, a few KB).
# 16-column steps make D = 4096 cut into up to 256 ranges, enough for 2 programs per SM. 2
# warps for the [16, 64] sum (4 spill 8 B on sm_90 with dropout: fastpeft check).
_DOWN_TILE_DECODE = Tile(16, 16, 2, 2)
DECODE_RANK_BLOCK = 64
# The split's partials (fp32 [splits, M, R], written, then read by the sum kernel) may add
# at most this share of the projection's own bytes (h and W_down): the issue-19 target
# allows 1.5x the minimum, and the partials cost twice their size.
PARTIALS_SHARE = 0.25
# The sum kernels' tile (forward and dz): 16 rows (all of a decode step) x 16 ranks, so that
# R = 256 spreads over 16 programs (they read 16-600 KB of partials at decode: a launch's
# latency is most of the cost).
SUM_TILE = Tile(16, 16, 4, 1)

# Up projection (``bottleneck_up_kernel``): [BLOCK_M, BLOCK_N] tiles of out, the rank walked
# UP_RANK_STEP at a time (16 for ranks <= 16, whose padded tile is 16). The rows by M (16 at
# decode, 32 up to 64 rows, then 64: act(z) re-read per column tile, W_up per row tile); the
# columns as wide as still gives one wave (128 at M >= 512 on D = 4096), down to 16
# (256 tiles at D = 4096 for one token). 4 warps, 8 for the 64 x 128 tile (its fp32
# accumulator is 64 registers a thread with 4, which spill 80 B on sm_80 with fp32 weights:
# fastpeft check); 3 stages of [64, 32] act and [32, 128] W_up fp32 tiles, ~72 KB.
UP_ROW_BLOCKS = ((DECODE_MAX_M, 16), (64, 32), (None, 64))
UP_BLOCK_N_CHOICES = (128, 64, 32, 16)
UP_RANK_STEP = 32
UP_STAGES = 3


def _up_tile(rows: int, cols: int) -> Tile:
    return Tile(rows, cols, 8 if rows * cols >= 64 * 128 else 4, UP_STAGES)


@dataclass(frozen=True)
class RowPass:
    """A pass that shrinks ``[M, D]`` rows against an ``[R, D]`` weight (the down projection;
    dOut against W_up^T for dz): ``tile`` (BLOCK_M rows, BLOCK_D steps), ``rank_blocks`` blocks
    of ``rank_block`` ranks, and ``split`` over D (several ranges: fp32 partials, then a sum
    kernel with ``SUM_TILE``)."""

    tile: Tile
    rank_block: int
    rank_blocks: int
    split: Split


def _row_pass(m: int, d: int, rank: int, tile: Tile, rank_block: int, h_bytes: int, w_bytes: int,
              num_sms: int) -> RowPass:
    """The pass of ``tile`` and rank blocks of ``rank_block`` over ``[m, d]`` rows of
    ``h_bytes`` an element against a weight of ``w_bytes`` an element: split over D only while
    its tiles fill under half the SMs (as ``lora.configs.gemm_split``), up to PROGRAMS_PER_SM
    programs per SM, within about the PARTIALS_SHARE budget."""
    rank_blocks = cdiv(rank, rank_block)
    tiles = cdiv(m, tile.block_m) * rank_blocks
    wanted = 1
    if 2 * tiles < num_sms:
        budget = int(PARTIALS_SHARE * (m * d * h_bytes + rank * d * w_bytes) / (4 * m * rank))
        wanted = max(1, min(cdiv(PROGRAMS_PER_SM * num_sms, tiles), budget))
    # Whole steps per range, rounded down so that there are at least ``wanted`` ranges (at
    # most about wanted (1 + wanted / steps): 37 for 34 at M = 16, R = 256, D = 4096, where
    # rounding up would leave 32 x 4 = 128 programs on 132 SMs).
    steps = cdiv(d, tile.block_d)
    per_split = max(1, steps // wanted)
    return RowPass(tile, rank_block, rank_blocks, Split(cdiv(steps, per_split), per_split * tile.block_d))


def _decode_pass(m: int, d: int, rank: int, h_bytes: int, w_bytes: int, num_sms: int) -> RowPass:
    """A row pass at decode (m <= DECODE_MAX_M): one 16-row tile, rank blocks of
    DECODE_RANK_BLOCK, split over D."""
    return _row_pass(m, d, rank, _DOWN_TILE_DECODE, min(block_r(rank), DECODE_RANK_BLOCK), h_bytes, w_bytes,
                     num_sms)


@dataclass(frozen=True)
class ForwardPlan:
    """Tiles of one forward call: the down projection's pass, and the up projection's ``up``
    tile (``block_d`` = BLOCK_N) walking the rank ``up_r`` at a time."""

    down: RowPass
    up: Tile
    up_r: int


def plan_forward(m: int, d: int, rank: int, h_bytes: int, w_bytes: int, device: torch.device) -> ForwardPlan:
    """The forward's tiles for ``h [m, d]`` (``h_bytes`` an element), bottleneck ``rank``
    (1 <= rank <= MAX_RANK) and weights of ``w_bytes`` an element, on ``device``."""
    _check_rank(rank)
    num_sms, _ = device_info(device)
    r_block = block_r(rank)
    if m <= DECODE_MAX_M:
        down = _decode_pass(m, d, rank, h_bytes, w_bytes, num_sms)
    else:
        rank_block = min(r_block, DOWN_MAX_RANK_BLOCK)
        down = _row_pass(m, d, rank, _DOWN_TILES[rank_block], rank_block, h_bytes, w_bytes, num_sms)
    up_m = next(rows for limit, rows in UP_ROW_BLOCKS if limit is None or m <= limit)
    row_tiles = cdiv(m, up_m)
    up_n = next((n for n in UP_BLOCK_N_CHOICES if row_tiles * cdiv(d, n) >= num_sms), UP_BLOCK_N_CHOICES[-1])
    return ForwardPlan(down, _up_tile(up_m, up_n), min(UP_RANK_STEP, r_block))


# Column kernel of the backward (dW_up, db_up, dW_down, dh), keyed by the rank tile: a program
# owns BLOCK_D columns and walks its rows BLOCK_M at a time, with the fp32 sums
# [BLOCK_D, BLOCK_R] (dW_up) and [BLOCK_R, BLOCK_D] (dW_down), the W_down tile and four
# [BLOCK_M, BLOCK_D] tiles (g, h, the mask, dh) live at once. 32 rows and at most 2 stages:
# 64 rows or 3 stages spill 12-560 B with dropout and dh (fastpeft check). Ranks 32 and 128
# need 8 warps and a single stage (2 stages spill 8-168 B with fp16 weights, dropout and dh);
# rank 64 fits 2 stages with 8 warps. Every entry
# reaches up to 255 registers with 0 spills on sm_80 and sm_90.
_COLUMN_TILES = {
    16: Tile(32, 64, 4, 2),
    32: Tile(32, 64, 8, 1),
    64: Tile(32, 64, 8, 2),
}


# dh kernel of the backward for bottlenecks above COLUMN_MAX_RANK: a [BLOCK_M, BLOCK_D] tile of
# dz W_down per program, the rank walked DH_RANK_STEP at a time. A GEMM tile of a memory-bound
# pass (dz, fp32 [M, R], read per column tile; W_down per row tile; dh written): 128 x 64
# with 8 warps (107-171 registers, 0 spills; 128 x 128 spills 48 B on sm_80 with dropout and
# fp32 weights, and 64 x 64 reads W_down twice as often: 0.94 GB at M = 8192, D = 4096, R = 256
# against 0.81 GB); 2 stages overlap the next rank step's loads.
DH_TILE = Tile(128, 64, 8, 2)
DH_RANK_STEP = 32


@dataclass(frozen=True)
class Plan:
    """Tiles of one backward call: ``dz``, the dz kernel's pass; ``columns``, the column
    kernel's tile for its rank tile ``column_r``, or None for a bottleneck wider than
    COLUMN_MAX_RANK (the weight-gradient GEMMs on ``wgrad_tile`` in blocks of WIDE_RANK_BLOCK
    ranks, and the dh kernel on DH_TILE); ``rows``, the row ranges (of the column kernel or of
    the GEMMs), each summed into fp32 partials."""

    dz: RowPass
    columns: Tile | None
    column_r: int
    rows: Split

    @property
    def wide(self) -> bool:
        return self.columns is None


def _check_rank(rank: int) -> None:
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"bottleneck kernels take 1 <= R <= {MAX_RANK}, got R={rank}")


def plan(m: int, d: int, rank: int, g_bytes: int, w_bytes: int, device: torch.device) -> Plan:
    """The backward's tiles for dOut and h ``[m, d]`` (dOut's elements ``g_bytes``),
    bottleneck ``rank`` (1 <= rank <= MAX_RANK) and weights of ``w_bytes`` an element, on
    ``device``."""
    _check_rank(rank)
    num_sms, _ = device_info(device)
    r_block = block_r(rank)
    if m <= DECODE_MAX_M:
        dz = _decode_pass(m, d, rank, g_bytes, w_bytes, num_sms)
    else:
        rank_block = min(r_block, DOWN_MAX_RANK_BLOCK)
        dz = _row_pass(m, d, rank, _ROW_TILES[rank_block], rank_block, g_bytes, w_bytes, num_sms)
    if r_block > COLUMN_MAX_RANK:
        w = wgrad_tile()
        tiles = cdiv(d, w.block_n) * cdiv(rank, WIDE_RANK_BLOCK)
        # Each GEMM's partials ([splits, R, D] fp32, written and read back) within the
        # PARTIALS_SHARE budget of its inputs (X [M, D] and the fp32 [M, R] L): at M = 512,
        # R = 256 one range (the 4 MB [R, D] sum outweighs the 4.5 MB inputs), at M = 8192 two.
        budget = int(PARTIALS_SHARE * (m * d * g_bytes + m * rank * 4) / (2 * rank * d * 4))
        return Plan(dz, None, WIDE_RANK_BLOCK, _row_split(m, w.block_m, tiles, num_sms, budget))
    columns = _COLUMN_TILES[r_block]
    return Plan(dz, columns, r_block, _row_split(m, columns.block_m, cdiv(d, columns.block_d), num_sms))


def _row_split(m: int, block_m: int, tiles: int, num_sms: int, max_splits: int | None = None) -> Split:
    """Row ranges (whole ``block_m`` tiles) of a pass over ``m`` rows with ``tiles`` output
    tiles: enough for PROGRAMS_PER_SM programs per SM, at most ``max_splits`` (at least 1)."""
    row_blocks = cdiv(m, block_m)
    wanted = max(1, cdiv(PROGRAMS_PER_SM * num_sms, tiles))
    if max_splits is not None:
        wanted = max(1, min(wanted, max_splits))
    per_split = cdiv(row_blocks, min(wanted, row_blocks)) * block_m
    return Split(cdiv(m, per_split), per_split)


def tile_choices() -> list[tuple[str, int, Tile]]:
    """Every ``(kernel kind, rank tile, tile)`` the planners can return: kind "down" and
    "rows" (the dz kernel; rank tile: the rank block), "sum" (both sum kernels), "up" (rank
    tile: the rank step), "columns" or "dh" (for ``bottleneck_kernel_specs``)."""
    decode = [(r, _DOWN_TILE_DECODE) for r in sorted({min(r, DECODE_RANK_BLOCK) for r in BLOCK_R_CHOICES})]
    up_steps = sorted({min(UP_RANK_STEP, r) for r in BLOCK_R_CHOICES})
    up_tiles = [_up_tile(m, n) for _, m in UP_ROW_BLOCKS for n in UP_BLOCK_N_CHOICES]
    return ([("down", r, t) for r, t in [*_DOWN_TILES.items(), *decode]]
            + [("rows", r, t) for r, t in [*_ROW_TILES.items(), *decode]]
            + [("sum", SUM_TILE.block_d, SUM_TILE)]
            + [("up", r, t) for r in up_steps for t in up_tiles]
            + [("columns", r, t) for r, t in _COLUMN_TILES.items()]
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
