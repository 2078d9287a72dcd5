"""The memory traffic and FLOPs of a recorded launch (``fastpeft.plan.recording.Launch``).

Two byte counts per operand, both DRAM-traffic estimates, not measurements:

- ``bytes`` ("by the tiling"): every program reads what its tile needs and nothing is
  shared between programs through the L2 cache, so an operand re-read by every row tile
  (a weight) or column tile (the activations) counts once per tile: an upper bound.
- ``l2_bytes``: the same, except that re-reads hit the L2 cache where that is likely
  (``read``, ``gemm_reads``): an operand no larger than the L2 budget is read from DRAM
  once however many programs read it; one re-read by consecutive programs (which run in the
  same wave) once per wave; the grouped GEMMs' weight once per group of row tiles and their
  activations once per group or wave. Closer to what a GPU moves, still an estimate.

Writes count once. The few bytes of index, rank and scaling vectors and of dropout seeds are
left out. FLOPs are those of the launch's dot products at the problem's sizes (padding of
tiles not counted), 2 per multiply-add; elementwise work is left out of the kernels' counts.

Triton kernels are costed one by one (``fastpeft.plan.kernel_costs``), torch ops generically
(``torch_op_cost``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastpeft.kernels.lora.configs import GROUP_M, cdiv
from fastpeft.plan.recording import Launch


@dataclass(frozen=True)
class Access:
    """One operand's traffic: ``bytes`` without L2 reuse, ``l2_bytes`` with it (module docstring)."""

    operand: str
    bytes: int
    l2_bytes: int
    write: bool = False


@dataclass(frozen=True)
class Cost:
    """A launch's accesses and FLOPs."""

    accesses: tuple[Access, ...]
    flops: int

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.accesses)

    @property
    def l2_bytes(self) -> int:
        return sum(a.l2_bytes for a in self.accesses)


def footprint(t: torch.Tensor) -> int:
    """Bytes of memory a tensor view spans (a broadcast dimension, stride 0, spans one element)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 1)
    return min(span, t.numel()) * t.element_size()


@dataclass(frozen=True)
class Hardware:
    """What the L2-reuse estimate needs of the GPU: its SM count (programs per wave, at one
    per SM) and ``l2_budget``, the bytes of an operand that stay in L2 while it is re-read."""

    sms: int
    l2_budget: int


def read(operand: str, once: int, times: int, hw: Hardware, l2_times: int | None = None,
         concurrent: bool = False) -> Access:
    """``once`` bytes read by ``times`` programs (or tile sweeps). With L2 reuse: once when they
    fit in ``hw.l2_budget``; else once per wave when the readers are consecutive programs
    (``concurrent``: they run side by side and share each line through L2); else ``l2_times``
    (default ``times``) times."""
    if once <= hw.l2_budget:
        l2 = once
    elif concurrent:
        l2 = once * cdiv(times, hw.sms)
    else:
        l2 = once * (times if l2_times is None else l2_times)
    return Access(operand, once * times, l2)


def write(operand: str, count: int) -> Access:
    return Access(operand, count, count, write=True)


def gemm_reads(
    p_name: str, p_bytes: int, p_rows: int, q_name: str, q_bytes: int, row_tiles: int, col_tiles: int,
    block_m: int, hw: Hardware,
) -> tuple[Access, Access]:
    """The operands of a grouped-order GEMM tile loop (``tile_utils.output_tile``): P ``[M, RED]``
    re-read by every column tile, Q ``[N, RED]`` by every row tile. Programs run ``GROUP_M``
    row tiles of one column tile, then of the next, so a wave holds ``GROUP_M`` row tiles x
    ``sms / GROUP_M`` column tiles. With L2 reuse each Q tile is read once per group of row
    tiles, and a group's rows of P once if they fit in the L2 budget, else once per wave."""
    rows_per_wave = min(GROUP_M, row_tiles)
    cols_per_wave = min(col_tiles, max(1, hw.sms // rows_per_wave))
    slab = min(GROUP_M * block_m, p_rows) * (p_bytes // max(p_rows, 1))
    p_l2 = 1 if slab <= hw.l2_budget else cdiv(col_tiles, cols_per_wave)
    return (read(p_name, p_bytes, col_tiles, hw, p_l2),
            read(q_name, q_bytes, row_tiles, hw, cdiv(row_tiles, GROUP_M)))


# Matrix products and the operand positions of their [M, K] and [K, N] factors (a batch
# dimension in front for bmm / baddbmm): their FLOPs are 2 M N K (times the batch).
_GEMMS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2), "baddbmm_": (1, 2)}
# Ops that overwrite their first argument without reading it.
_OVERWRITE_SELF = frozenset({"copy_", "fill_", "zero_", "random_", "uniform_", "normal_", "bernoulli_"})
# Gathers (read only the rows they return, and the index) and scatters (read the source and
# the index, read and write the rows they touch).
_GATHERS = frozenset({"index", "index_select"})
_SCATTERS = frozenset({"index_add_", "index_put_", "index_copy_", "index_add", "index_put"})


def _tensors(values: Any) -> list[torch.Tensor]:
    """The tensors among ``values`` (lists of tensors, e.g. ``index``'s indices, flattened)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


def torch_op_cost(launch: Launch) -> Cost:
    """The cost of an aten op as if its kernel read each input once and wrote each output
    once (cuBLAS for the matrix products: its own tiling is not visible without a GPU, so
    ``bytes`` and ``l2_bytes`` are the same, an ideal); gathers and scatters move the rows they
    touch."""
    name = launch.op.overloadpacket.__name__
    args = launch.inputs
    outputs = launch.outputs
    written = sum(footprint(t) for t in outputs)
    if name in _GATHERS:
        index = sum(footprint(t) for t in _tensors(args[1:]))
        return Cost((write("out", written), Access("gathered rows", written + index, written + index)), 0)
    if name in _SCATTERS:
        source = footprint(_tensors(args[1:])[-1])
        index = sum(footprint(t) for t in _tensors(args[1:])[:-1])
        return Cost((Access("rows read", source + index, source + index), write("rows written", 2 * source)), 0)
    inputs = {id(t): t for t in _tensors(args[1:] if name in _OVERWRITE_SELF else args)}
    read_bytes = sum(footprint(t) for t in inputs.values())
    if name in _GEMMS:
        a, b = (args[i] for i in _GEMMS[name])
        flops = 2 * a.numel() * b.shape[-1]
    else:  # elementwise and reductions: about one operation per element written
        flops = sum(t.numel() for t in outputs)
    return Cost((Access("inputs", read_bytes, read_bytes), write("outputs", written)), flops)
