"""Tokens grouped by adapter, on the device, with no host synchronisation.

``segments(adapter_ids, num_adapters, block_m)`` sorts the tokens by adapter (a stable sort:
tokens of one adapter keep their order, so the backward's sums run in a fixed order) and cuts
each adapter's run into tiles of ``block_m`` rows. All of it is torch ops on ``adapter_ids``'s
device whose output sizes depend only on T, L and ``block_m`` (never on the ids' values):
the tile list has the static length ``cdiv(T, block_m) + min(L, T)`` (each adapter present
adds at most one partial tile), and tiles past the real ones carry adapter ``L`` (the kernels
return at once). So a step that builds them can be captured in a CUDA graph and replayed
with another adapter mix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastpeft.kernels.multi_lora.configs import cdiv


class Segments(NamedTuple):
    """Tokens sorted by adapter. ``order [T]``: token index of each sorted row; ``seg_start``,
    ``seg_end`` ``[L + 1]``: each slot's rows ``[start, end)`` in sorted order (entry L: tokens
    without adapter, never read by the kernels); ``tile_adapter``, ``tile_row`` ``[num_tiles]``:
    each tile's slot (L past the last tile) and first sorted row. All int64."""

    order: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    tile_adapter: torch.Tensor
    tile_row: torch.Tensor


def max_tiles(num_tokens: int, num_adapters: int, block_m: int) -> int:
    """Static bound on the tile count: ``sum_i cdiv(c_i, m) <= cdiv(T, m) + min(L, T)``."""
    return cdiv(num_tokens, block_m) + min(num_adapters, num_tokens)


def segments(adapter_ids: torch.Tensor, num_adapters: int, block_m: int) -> Segments:
    """The sorted layout of ``adapter_ids [T]`` (ids outside ``[0, L)``: no adapter) in tiles
    of ``block_m`` rows. See the module docstring."""
    device = adapter_ids.device
    ids = adapter_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_adapters)
    key = torch.where(valid, ids, num_adapters)
    sorted_key, order = torch.sort(key, stable=True)
    slots = torch.arange(num_adapters + 2, device=device)
    bounds = torch.searchsorted(sorted_key, slots)  # bounds[i] = first sorted row of slot >= i
    # seg_end copied: a view one element in would not be 16-byte aligned (kernel specialization).
    seg_start, seg_end = bounds[:-1], bounds[1:].clone()
    counts = (seg_end - seg_start)[:num_adapters]
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    j = torch.arange(max_tiles(ids.numel(), num_adapters, block_m), device=device)
    tile_adapter = torch.searchsorted(tile_end, j, right=True)
    slot = tile_adapter.clamp(max=num_adapters - 1)
    tile_row = seg_start[slot] + (j - (tile_end[slot] - tiles[slot])) * block_m
    return Segments(order, seg_start, seg_end, tile_adapter, tile_row)
