"""Traffic and FLOPs of each Triton kernel of ``fastpeft.kernels``, from a recorded launch.

Each function reads the sizes, tensors and tile constexprs the launcher passed (``p``, by
the kernel's parameter names) and the grid, and says what the kernel's loops load and store
(see each kernel's docstring): which operand every program re-reads, per row tile or column
tile. ``fastpeft.plan.traffic`` explains the two byte counts and ``hw``. Readers that are
consecutive programs (the fastest grid axis) are marked ``concurrent``.
Notation: row tiles ``rt = cdiv(M, BLOCK_M)``, column tiles ``ct``; ``e(t)`` bytes per element.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fastpeft.kernels.lora.configs import cdiv
from fastpeft.plan.recording import Launch
from fastpeft.plan.traffic import Access, Cost, Hardware, gemm_reads, read, write

Params = Mapping[str, Any]
KernelCost = Callable[[Params, tuple[int, ...], Hardware], Cost]
# Kernel name -> the cost of one launch from its parameters, grid and the GPU.
KERNEL_COSTS: dict[str, KernelCost] = {}


def kernel_cost(name: str) -> Callable[[KernelCost], KernelCost]:
    """Register the cost function of the Triton kernel ``name``."""

    def register(fn: KernelCost) -> KernelCost:
        KERNEL_COSTS[name] = fn
        return fn

    return register


def triton_cost(launch: Launch, hw: Hardware) -> Cost:
    """The cost of a recorded Triton launch; KeyError for a kernel without a cost function
    here (so a new kernel cannot pass as free)."""
    try:
        fn = KERNEL_COSTS[launch.name]
    except KeyError:
        raise KeyError(f"fastpeft.plan has no traffic model for the kernel {launch.name} (launched by "
                       f"{launch.source}): add one to fastpeft/plan/kernel_costs.py") from None
    return fn(launch.params, launch.grid, hw)


def e(t: torch.Tensor) -> int:
    return t.element_size()


# --- LoRA linear (fastpeft.kernels.lora.kernels, hybrid_kernels) -------------------------


@kernel_cost("lora_shrink_kernel")
def _lora_shrink(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """x read once (each program its rows and K range); A by every row tile; fp32 partials
    ``[splits, M, R]`` written."""
    m, k, r = p["M"], p["K"], p["R"]
    row_tiles, splits = grid
    return Cost((read("x", m * k * e(p["x_ptr"]), 1, hw),
                 read("A", r * k * e(p["a_ptr"]), row_tiles, hw, concurrent=True),
                 write("s partials", splits * m * r * 4)), 2 * m * k * r)


def _fwd_cost(p: Params, x_bytes: int, w_bytes: int, fused: bool, hw: Hardware) -> Cost:
    """The forward GEMM's traffic for x and W elements of ``x_bytes`` / ``w_bytes``: x (per
    column tile) and W (per row tile) in ``output_tile``'s grouped order; A per tile when the
    shrink is ``fused``, else the shrink's partials per column tile; B and the bias per row
    tile; y and s written."""
    m, n, k, r = p["M"], p["N"], p["K"], p["R"]
    rt, ct = cdiv(m, p["BLOCK_M"]), cdiv(n, p["BLOCK_N"])
    x_read, w_read = gemm_reads("x", m * k * x_bytes, m, "W", n * k * w_bytes, rt, ct, p["BLOCK_M"], hw)
    accesses = [x_read, w_read, read("B", n * r * e(p["b_ptr"]), rt, hw)]
    if p["HAS_BIAS"]:
        accesses.append(read("bias", n * e(p["bias_ptr"]), rt, hw))
    if fused:
        accesses.append(read("A", r * k * e(p["a_ptr"]), rt * ct, hw))
    else:
        accesses.append(read("s partials", p["num_parts"] * m * r * 4, ct, hw))
    accesses += [write("y", m * n * e(p["y_ptr"])), write("s", m * r * 4)]
    return Cost(tuple(accesses), 2 * m * n * k + 2 * m * n * r + (2 * m * k * r * ct if fused else 0))


@kernel_cost("lora_fwd_kernel")
def _lora_fwd(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """One program per output tile (``_fwd_cost``), the shrink fused or not."""
    return _fwd_cost(p, e(p["x_ptr"]), e(p["w_ptr"]), p["FUSE_SHRINK"], hw)


@kernel_cost("lora_fwd_tma_kernel")
def _lora_fwd_tma(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """The non-fused ``lora_fwd_kernel``'s traffic (``_fwd_cost``; x and W read through their
    TMA descriptors): its ``grid[0]`` persistent programs take the tiles in the same grouped
    order, tile t on program t mod grid[0], so the tiles in flight at any time are the same
    consecutive run as in a wave of one program per tile, and each program re-reads what
    such a program would. TMA changes how the tiles are loaded, not which bytes. (The plan's
    fill factor counts programs, not tiles, so it does not see that some programs take one
    tile more than others.)"""
    return _fwd_cost(p, p["x_desc"].base.element_size(), p["w_desc"].base.element_size(), False, hw)


@kernel_cost("lora_gemm_split_kernel")
def _lora_gemm_split(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """Split-K GEMM: P per column tile and Q per row tile over all splits; fp32 partials
    ``[splits, M, N]`` written."""
    m, n, red = p["M"], p["N"], p["RED"]
    splits = grid[1]
    rt, ct = cdiv(m, p["BLOCK_M"]), cdiv(n, p["BLOCK_N"])
    reads = gemm_reads("P", m * red * e(p["p_ptr"]), m, "Q", n * red * e(p["q_ptr"]), rt, ct, p["BLOCK_M"], hw)
    return Cost((*reads, write("partials", splits * m * n * 4)), 2 * m * n * red)


@kernel_cost("lora_fwd_split_epilogue_kernel")
def _lora_fwd_split_epilogue(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """The GEMM's partials once; the shrink's partials per column tile; B, bias per row tile."""
    m, n, r = p["M"], p["N"], p["R"]
    rt, ct = cdiv(m, p["BLOCK_M"]), cdiv(n, p["BLOCK_N"])
    accesses = [read("GEMM partials", p["num_splits"] * m * n * 4, 1, hw),
                read("s partials", p["num_parts"] * m * r * 4, ct, hw), read("B", n * r * e(p["b_ptr"]), rt, hw)]
    if p["HAS_BIAS"]:
        accesses.append(read("bias", n * e(p["bias_ptr"]), rt, hw))
    accesses += [write("y", m * n * e(p["y_ptr"])), write("s", m * r * 4)]
    return Cost(tuple(accesses), 2 * m * n * r)


@kernel_cost("lora_bwd_dx_kernel")
def _lora_bwd_dx(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """dY per column tile of dX, W per row tile (the GEMM), A per row tile and dS per column
    tile (the epilogue); dX written."""
    m, n, k, r = p["M"], p["N"], p["K"], p["R"]
    rt, ct = cdiv(m, p["BLOCK_M"]), cdiv(k, p["BLOCK_K"])
    dy_read, w_read = gemm_reads("dY", m * n * e(p["dy_ptr"]), m, "W", n * k * e(p["w_ptr"]), rt, ct, p["BLOCK_M"], hw)
    return Cost((dy_read, w_read, read("A", r * k * e(p["a_ptr"]), rt, hw), read("dS", m * r * 4, ct, hw),
                 write("dX", m * k * e(p["dx_ptr"]))), 2 * m * n * k + 2 * m * k * r)


@kernel_cost("lora_bwd_dx_split_epilogue_kernel")
def _lora_bwd_dx_split_epilogue(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    m, k, r = p["M"], p["K"], p["R"]
    rt, ct = cdiv(m, p["BLOCK_M"]), cdiv(k, p["BLOCK_K"])
    return Cost((read("GEMM partials", p["num_splits"] * m * k * 4, 1, hw), read("A", r * k * e(p["a_ptr"]), rt, hw),
                 read("dS", m * r * 4, ct, hw), write("dX", m * k * e(p["dx_ptr"]))), 2 * m * k * r)


@kernel_cost("lora_bwd_wgrad_kernel")
def _lora_bwd_wgrad(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """dA (L = dS, X = x) or dB (L = s, X = dY), and the bottleneck's dW_down / dW_up: X read
    once per rank block (the blocks of a column tile run together), the fp32 L (each block
    its own ranks) per column tile; fp32 partials ``[splits, R, C]`` written."""
    m, c, r = p["M"], p["C"], p["R"]
    rank_blocks = cdiv(r, p["BLOCK_R"])
    col_tiles, splits = grid[0] // rank_blocks, grid[1]
    return Cost((read("X", m * c * e(p["x_ptr"]), rank_blocks, hw, concurrent=True),
                 read("L (fp32)", m * r * 4, col_tiles, hw, concurrent=True),
                 write("partials", splits * r * c * 4)), 2 * m * c * r)


@kernel_cost("sum_partials_kernel")
def _sum_partials(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    numel, parts = p["numel"], p["num_parts"]
    return Cost((read("partials", parts * numel * 4, 1, hw), write("sum", numel * e(p["total_ptr"]))), parts * numel)


@kernel_cost("lora_hybrid_fwd_kernel")
def _lora_hybrid_fwd(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """Each of a row tile's ``split_n`` programs runs the whole shrink (x and A re-read; the
    programs run together, so with L2 reuse x once), then writes its share of the column
    tiles (B and the bias once per row tile); y and s written."""
    m, n, k, r, split = p["M"], p["N"], p["K"], p["R"], p["split_n"]
    rt = cdiv(m, p["BLOCK_M"])
    accesses = [read("x", m * k * e(p["x_ptr"]), split, hw, 1),
                read("A", r * k * e(p["a_ptr"]), rt * split, hw, concurrent=True),
                read("B", n * r * e(p["b_ptr"]), rt, hw)]
    if p["HAS_BIAS"]:
        accesses.append(read("bias", n * e(p["bias_ptr"]), rt, hw))
    accesses += [write("y", m * n * e(p["y_ptr"])), write("s", m * r * 4)]
    return Cost(tuple(accesses), 2 * m * k * r * split + 2 * m * n * r)


@kernel_cost("lora_hybrid_dx_kernel")
def _lora_hybrid_dx(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    m, k, r = p["M"], p["K"], p["R"]
    rt, ct = grid
    return Cost((read("dS", m * r * 4, ct, hw), read("A", r * k * e(p["a_ptr"]), rt, hw),
                 write("dX (LoRA term)", m * k * e(p["dx_ptr"]))), 2 * m * k * r)


# --- Bottleneck adapter (fastpeft.kernels.bottleneck.kernels) ----------------------------


@kernel_cost("bottleneck_down_kernel")
def _bottleneck_down(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """h by every rank block (consecutive programs; each its rows and D range); W_down by every
    row tile (each rank block its rows of it); b_down per row tile; with one split z and act(z) (fp32
    ``[M, R]``) written, else the fp32 partials ``[splits, M, R]``."""
    m, d, r = p["M"], p["D"], p["R"]
    row_tiles, splits, rank_blocks = _row_pass_grid(p, grid)
    accesses = [read("h", m * d * e(p["h_ptr"]), rank_blocks, hw, concurrent=True),
                read("W_down", r * d * e(p["wd_ptr"]), row_tiles, hw, concurrent=True)]
    if p["has_b_down"] and splits == 1:
        accesses.append(read("b_down", r * e(p["bd_ptr"]), row_tiles, hw))
    accesses.append(write("z, act(z)", 2 * m * r * 4) if splits == 1 else write("z partials", splits * m * r * 4))
    return Cost(tuple(accesses), 2 * m * d * r)


@kernel_cost("bottleneck_down_sum_kernel")
def _bottleneck_down_sum(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """The partials read once, b_down per row tile, z and act(z) written."""
    m, r, splits = p["M"], p["R"], p["num_splits"]
    accesses = [read("z partials", splits * m * r * 4, 1, hw)]
    if p["has_b_down"]:
        accesses.append(read("b_down", r * e(p["bd_ptr"]), grid[0], hw))
    return Cost((*accesses, write("z, act(z)", 2 * m * r * 4)), 0)


@kernel_cost("bottleneck_up_kernel")
def _bottleneck_up(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """act(z) (fp32 ``[M, R]``) by every column tile, W_up and b_up by every row tile
    (consecutive programs are row tiles of one column tile); the residual once; out written."""
    m, d, r = p["M"], p["D"], p["R"]
    row_tiles, col_tiles = grid
    accesses = [read("act(z)", m * r * 4, col_tiles, hw),
                read("W_up", d * r * e(p["wu_ptr"]), row_tiles, hw, concurrent=True)]
    if p["has_b_up"]:
        accesses.append(read("b_up", d * e(p["bu_ptr"]), row_tiles, hw, concurrent=True))
    accesses += [read("residual", m * d * e(p["res_ptr"]), 1, hw), write("out", m * d * e(p["out_ptr"]))]
    return Cost(tuple(accesses), 2 * m * d * r)


def _row_pass_grid(p: Params, grid: tuple[int, ...]) -> tuple[int, int, int]:
    """``(row tiles, splits, rank blocks)`` of a row-pass launch (axis 0: row tiles x rank blocks)."""
    programs, splits = grid
    rank_blocks = cdiv(p["R"], p["BLOCK_R"])
    return programs // rank_blocks, splits, rank_blocks


@kernel_cost("bottleneck_bwd_dz_kernel")
def _bottleneck_bwd_dz(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """dOut by every rank block (consecutive programs), W_up per row tile; with one split z
    read and dz and act(z) (fp32 ``[M, R]``) and per-program partial sums written, else the
    fp32 partials of g W_up."""
    m, d, r = p["M"], p["D"], p["R"]
    row_tiles, splits, rank_blocks = _row_pass_grid(p, grid)
    accesses = [read("dOut", m * d * e(p["g_ptr"]), rank_blocks, hw, concurrent=True),
                read("W_up", d * r * e(p["wu_ptr"]), row_tiles, hw, concurrent=True)]
    if splits == 1:
        accesses += [read("z", m * r * 4, 1, hw), write("dz, act(z)", 2 * m * r * 4),
                     write("partials", row_tiles * rank_blocks * (r + 1) * 4)]
    else:
        accesses.append(write("g W_up partials", splits * m * r * 4))
    return Cost(tuple(accesses), 2 * m * d * r)


@kernel_cost("bottleneck_bwd_dz_sum_kernel")
def _bottleneck_bwd_dz_sum(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """The partials and z read once; dz, act(z) and per-program partial sums written."""
    m, r, splits = p["M"], p["R"], p["num_splits"]
    return Cost((read("g W_up partials", splits * m * r * 4, 1, hw), read("z", m * r * 4, 1, hw),
                 write("dz, act(z)", 2 * m * r * 4), write("partials", grid[0] * grid[1] * (r + 1) * 4)), 0)


@kernel_cost("bottleneck_bwd_wgrad_dh_kernel")
def _bottleneck_bwd_wgrad_dh(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """dOut and h read once; dz and act(z) (fp32) per column tile; W_down per split (for dh);
    fp32 weight-gradient partials per split and dh written."""
    m, d, r = p["M"], p["D"], p["R"]
    col_tiles, splits = grid
    accesses = [read("dOut", m * d * e(p["g_ptr"]), 1, hw), read("h", m * d * e(p["h_ptr"]), 1, hw),
                read("dz, act(z)", 2 * m * r * 4, col_tiles, hw, concurrent=True)]
    flops = 4 * m * d * r
    if p["NEED_DH"]:
        accesses += [read("W_down", r * d * e(p["wd_ptr"]), splits, hw), write("dh", m * d * e(p["dh_ptr"]))]
        flops += 2 * m * d * r
    accesses.append(write("partials", splits * (2 * d * r + d) * 4))
    return Cost(tuple(accesses), flops)


@kernel_cost("bottleneck_bwd_dh_kernel")
def _bottleneck_bwd_dh(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    m, d, r = p["M"], p["D"], p["R"]
    rt, ct = grid
    accesses = [read("dz", m * r * 4, ct, hw), read("W_down", r * d * e(p["wd_ptr"]), rt, hw, concurrent=True)]
    if p["residual_is_h"]:
        accesses.append(read("dOut", m * d * e(p["g_ptr"]), 1, hw))
    accesses.append(write("dh", m * d * e(p["dh_ptr"])))
    return Cost(tuple(accesses), 2 * m * d * r)


# --- Multi-adapter LoRA (fastpeft.kernels.multi_lora.kernels) ----------------------------
# These kernels skip the programs without work (a token without adapter, a tile past the
# last segment, a rank block past the adapter's rank), so their traffic depends on the
# adapter ids: the plan passes real ids and ranks (CPU tensors) and reads them here.


def _slot_rank(ranks: torch.Tensor, slot: int, r_max: int) -> int:
    return min(max(int(ranks[slot]), 0), r_max)


def _decode_tokens(p: Params) -> list[tuple[int, int]]:
    """(slot, rank) of each token with a valid adapter."""
    num_slots, r_max = p["L"], p["R_MAX"]
    out = []
    for slot in p["ids_ptr"].tolist():
        if 0 <= slot < num_slots:
            out.append((slot, _slot_rank(p["ranks_ptr"], slot, r_max)))
    return out


@kernel_cost("multi_lora_decode_shrink_kernel")
def _multi_lora_decode_shrink(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """Program (token, rank block, K split): the split's columns of x's row and of the block's
    rows of A_i (with L2 reuse, each token's row and each adapter's block once); an fp32
    partial of s written per split."""
    k, block_r, splits = p["K"], p["BLOCK_R"], grid[2]
    ex, ea = e(p["x_ptr"]), e(p["a_ptr"])
    x_bytes = x_l2 = a_bytes = a_l2 = s_bytes = flops = 0
    seen = set()
    for slot, rank in _decode_tokens(p):
        blocks = cdiv(rank, block_r)
        x_bytes += blocks * k * ex
        x_l2 += k * ex if blocks else 0
        a_bytes += rank * k * ea
        if slot not in seen:
            seen.add(slot)
            a_l2 += rank * k * ea
        s_bytes += splits * rank * 4
        flops += 2 * k * rank
    return Cost((Access("x", x_bytes, x_l2), Access("A", a_bytes, a_l2), write("s", s_bytes)), flops)


@kernel_cost("multi_lora_decode_expand_kernel")
def _multi_lora_decode_expand(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """Program (token, column block): the block's rows of B_i, the shrink's ``num_splits``
    partials of s's row (summed in the program); y's row read and written."""
    n, splits = p["N"], p["num_splits"]
    col_blocks = grid[1]
    eb, ey = e(p["b_ptr"]), e(p["y_ptr"])
    b_bytes = b_l2 = s_bytes = s_l2 = y_bytes = flops = 0
    seen = set()
    for slot, rank in _decode_tokens(p):
        b_bytes += n * rank * eb
        if slot not in seen:
            seen.add(slot)
            b_l2 += n * rank * eb
        s_bytes += col_blocks * splits * rank * 4
        s_l2 += splits * rank * 4
        y_bytes += n * ey
        flops += 2 * n * rank
    return Cost((Access("B", b_bytes, b_l2), Access("s", s_bytes, s_l2), Access("y", y_bytes, y_bytes),
                 write("y", y_bytes)), flops)


def _segment_tiles(p: Params) -> list[tuple[int, int, int]]:
    """(slot, rank, rows) of each tile with work (``fastpeft.kernels.multi_lora.segments``)."""
    num_slots, r_max, block_m = p["L"], p["R_MAX"], p["BLOCK_M"]
    out = []
    for slot, row in zip(p["tile_adapter_ptr"].tolist(), p["tile_row_ptr"].tolist()):
        if slot < num_slots:
            rows = min(block_m, int(p["seg_end_ptr"][slot]) - row)
            out.append((slot, _slot_rank(p["ranks_ptr"], slot, r_max), rows))
    return out


@kernel_cost("multi_lora_shrink_kernel")
def _multi_lora_shrink(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """Program (tile, rank block, split): the tile's rows of P and the block's rows of Q_i over
    the split's share of the reduction, so over the splits each tile's P rows once per rank
    block and Q_i's rows once per tile (with L2 reuse: each tile's rows once, each adapter's
    rows once); an fp32 partial of the tile's rows written per split."""
    red, block_r, splits = p["K"], p["BLOCK_R"], grid[2]
    ep, eq = e(p["x_ptr"]), e(p["a_ptr"])
    p_bytes = p_l2 = q_bytes = q_l2 = s_bytes = flops = 0
    seen = set()
    for slot, rank, rows in _segment_tiles(p):
        blocks = cdiv(rank, block_r)
        p_bytes += blocks * rows * red * ep
        p_l2 += rows * red * ep if blocks else 0
        q_bytes += rank * red * eq
        if slot not in seen:
            seen.add(slot)
            q_l2 += rank * red * eq
        s_bytes += splits * rows * rank * 4
        flops += 2 * rows * red * rank
    return Cost((Access("P", p_bytes, p_l2), Access("Q", q_bytes, q_l2), write("s", s_bytes)), flops)


@kernel_cost("multi_lora_expand_kernel")
def _multi_lora_expand(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """Program (tile, column block): the tile's rows of each of the shrink's ``num_splits``
    partials (re-read by every column block) and the block of Q_i; the tile's rows of the
    output read and written."""
    n, splits = p["N"], p["num_splits"]
    col_blocks = grid[1]
    eq, ey = e(p["b_ptr"]), e(p["y_ptr"])
    q_bytes = q_l2 = s_bytes = s_l2 = y_bytes = flops = 0
    seen = set()
    for slot, rank, rows in _segment_tiles(p):
        q_bytes += n * rank * eq
        if slot not in seen:
            seen.add(slot)
            q_l2 += n * rank * eq
        s_bytes += col_blocks * splits * rows * rank * 4
        s_l2 += splits * rows * rank * 4
        y_bytes += rows * n * ey
        flops += 2 * rows * n * rank
    return Cost((Access("Q", q_bytes, q_l2), Access("s", s_bytes, s_l2), Access("out", y_bytes, y_bytes),
                 write("out", y_bytes)), flops)


# --- Dropout mask (fastpeft.kernels.philox_dropout) -------------------------------------


@kernel_cost("keep_mask_kernel")
def _keep_mask(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """The ``[M, K]`` Philox keep-mask written, one byte per element (nothing read but the seed)."""
    return Cost((write("mask", p["M"] * p["K"]),), 0)


# --- Quantized weights (fastpeft.kernels.quant.kernels, decode_kernel) ------------------


def _scale_reads(n_elements: int, p: Params, hw: Hardware) -> list[Access]:
    """A 4-bit weight's block scales read once (with double quantization the 8-bit codes and
    the nested fp32 scales; the code tables are L2-resident and left out, as index vectors)."""
    blocks = cdiv(n_elements, p["blocksize"])
    if not p["NESTED"]:
        return [read("scales", blocks * 4, 1, hw)]
    return [read("scale codes", blocks, 1, hw), read("nested scales", cdiv(blocks, p["nested_blocksize"]) * 4, 1, hw)]


@kernel_cost("dequant_4bit_kernel")
def _dequant_4bit(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """The packed codes and their scales read once; W written in the output dtype."""
    n_bytes = p["n_bytes"]
    return Cost((read("packed W", n_bytes, 1, hw), *_scale_reads(2 * n_bytes, p, hw),
                 write("W", 2 * n_bytes * e(p["out_ptr"]))), 0)


@kernel_cost("dequant_int8_kernel")
def _dequant_int8(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """CB and the row scales read once; W written in the output dtype."""
    n = p["n_elements"]
    return Cost((read("CB", n, 1, hw), read("row scales", n // p["k"] * 4, 1, hw),
                 write("W", n * e(p["out_ptr"]))), 0)


@kernel_cost("qlora_decode_kernel")
def _qlora_decode(p: Params, grid: tuple[int, ...], hw: Hardware) -> Cost:
    """Program (column block): its rows of the packed weight and their scales, once over all
    programs; x's M rows and s' by every program (consecutive programs); its rows of B and
    the bias; y written."""
    m, n, k, r = p["M"], p["N"], p["K"], p["R"]
    programs = grid[0]
    weight = [read("CB", n * k, 1, hw), read("row scales", n * 4, 1, hw)] if p["INT8"] else [
        read("packed W", n * k // 2, 1, hw), *_scale_reads(n * k, p, hw)]
    accesses = [*weight, read("x", m * k * e(p["x_ptr"]), programs, hw, concurrent=True),
                read("s'", m * r * e(p["s_ptr"]), programs, hw, concurrent=True),
                read("B", n * r * e(p["b_ptr"]), 1, hw)]
    if p["HAS_BIAS"]:
        accesses.append(read("bias", n * e(p["bias_ptr"]), 1, hw))
    accesses.append(write("y", m * n * e(p["y_ptr"])))
    return Cost(tuple(accesses), 2 * m * n * k + 2 * m * n * r)
