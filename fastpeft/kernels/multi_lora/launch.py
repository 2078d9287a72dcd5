"""Launchers of the multi-adapter LoRA kernels (``multi_lora.kernels``).

Argument contract shared by every launcher here and by the CUDA C++ decode launcher
(``multi_lora.cuda_launch.multi_lora_decode``, same signature and semantics):

- ``x [T, K]``: fp16 / bf16 / fp32, unit column stride (any row stride);
- ``lora_a [L, R_MAX, K]``, ``lora_b [L, N, R_MAX]``: contiguous, x's dtype or fp32;
- ``scalings [L]``: float32, contiguous;
- ``adapter_ids [T]``: int64, contiguous; an id outside ``[0, L)`` (``-1``: base only) means no
  adapter: the row is not touched and no slot is read for it;
- ``ranks [L]``: int64, contiguous; slot i uses its first ``clamp(ranks[i], 0, R_MAX)`` rows of
  A_i and columns of B_i, and the rest of the slot is never read.

The op (``fastpeft.ops.multi_lora_linear``) brings its arguments into this form. Nothing here
reads device memory on the host and every grid is sized from T, L, R_MAX, N, K and the SM
count: a step can be captured in a CUDA graph and replayed with other ids, ranks and slot
contents. Launches run on x's device (``on_device_of``). No kernel uses atomics: results are bitwise
reproducible.
"""

from __future__ import annotations

import torch

from fastpeft.kernels import launch_device
from fastpeft.kernels.launch_device import on_device_of
from fastpeft.kernels.multi_lora import configs
from fastpeft.kernels.multi_lora.configs import cdiv
from fastpeft.kernels.multi_lora.kernels import (
    multi_lora_decode_expand_kernel,
    multi_lora_decode_shrink_kernel,
    multi_lora_expand_kernel,
    multi_lora_shrink_kernel,
    multi_lora_wgrad_kernel,
)
from fastpeft.kernels.multi_lora.segments import Segments, segments


def precision(x_dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for the widened operands: tf32 for 16-bit activations (exact
    for their values; fp32 adapters are rounded to tf32 there, as the LoRA kernels' rank-r
    side is), IEEE fp32 for fp32 activations (which reach the kernels only in the
    interpreter: ``configs.KERNEL_DTYPES``)."""
    return "ieee" if x_dtype == torch.float32 else "tf32"


def multi_lora_decode(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
) -> None:
    """Decode (BGMV): ``y[t] += scalings[i] * (x[t] A_i[:r_i]^T) B_i[:, :r_i]^T`` in place, for
    every t whose ``i = adapter_ids[t]`` lies in ``[0, L)``; other rows of y are not touched.

    ``y [T, N]``: x's dtype, unit column stride (any row stride); written in place (read once,
    written once per touched row). The other arguments follow the module's contract. No sort:
    one row per token, each with its own adapter; meant for small T (``DECODE_MAX_TOKENS``).
    An fp32 scratch ``s [S, T, R_MAX]`` holds the partials of ``scalings[i] * x[t] A_i^T``
    over ``configs.decode_shrink_splits`` ranges of K between the two kernels; the expand sums
    them in a fixed order (no atomics: bitwise reproducible for a given SM count). Grids:
    shrink ``(T, cdiv(R_MAX, 4), S)``, expand ``(T, cdiv(N, BLOCK_N))`` with ``BLOCK_N`` from
    ``configs.decode_expand_tile``; both at least one program per SM where the problem allows.
    Returns None.
    """
    num_tokens, k = x.shape
    num_slots, r_max, _ = lora_a.shape
    n = lora_b.shape[1]
    if num_tokens == 0 or num_slots == 0:
        return
    shrink = configs.DECODE_SHRINK
    expand = configs.decode_expand_tile(num_tokens, n, x.device)
    splits = configs.decode_shrink_splits(num_tokens, r_max, k, x.device)
    s = launch_device.empty_output((splits, num_tokens, r_max), torch.float32, x.device)
    with on_device_of(x):
        multi_lora_decode_shrink_kernel[(num_tokens, cdiv(r_max, shrink.block_r), splits)](
            x, lora_a, scalings, adapter_ids, ranks, s,
            k, num_slots, r_max, x.stride(0),
            BLOCK_R=shrink.block_r, BLOCK_K=shrink.block_n, num_warps=shrink.num_warps, num_stages=shrink.num_stages,
        )
        multi_lora_decode_expand_kernel[(num_tokens, cdiv(n, expand.block_n))](
            y, lora_b, adapter_ids, ranks, s,
            n, num_slots, r_max, y.stride(0), splits,
            BLOCK_N=expand.block_n, BLOCK_R=expand.block_r, SPLIT_BLOCK=configs.DECODE_SPLIT_BLOCK,
            R_ALIGN=configs.decode_rank_align(r_max), num_warps=expand.num_warps, num_stages=expand.num_stages,
        )


def _shrink(
    p: torch.Tensor, q: torch.Tensor, q_strides: tuple[int, int, int], scalings: torch.Tensor, ranks: torch.Tensor,
    seg: Segments, r_max: int, splits: int = 1,
) -> torch.Tensor:
    """``scalings[i] * P[t] Q_i^T`` for every token with an adapter, in sorted order, as fp32
    partials over ``splits`` ranges of the reduction: ``[splits, T, R_MAX]`` (entries of
    tokens without adapter and past ``r_i`` are not written; one split: ``[0]`` is the
    product). Q is A (strides of ``[L, R, K]``) or B read as ``[L, R, N]``."""
    num_tokens, red = p.shape
    num_slots = ranks.shape[0]
    tile = configs.shrink_tile(num_tokens, r_max)
    out = launch_device.empty_output((splits, num_tokens, r_max), torch.float32, p.device)
    multi_lora_shrink_kernel[(seg.tile_adapter.shape[0], cdiv(r_max, tile.block_r), splits)](
        p, q, scalings, ranks, seg.order, seg.tile_adapter, seg.tile_row, seg.seg_end, out,
        red, num_slots, r_max, p.stride(0), *q_strides, out.stride(0),
        BLOCK_M=tile.block_m, BLOCK_R=tile.block_r, BLOCK_K=tile.block_n,
        PRECISION=precision(p.dtype), SPLIT_K=splits > 1, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out


def _expand(
    out: torch.Tensor, s: torch.Tensor, q: torch.Tensor, q_strides: tuple[int, int, int], ranks: torch.Tensor,
    seg: Segments,
) -> None:
    """``out[t] += (sum_p s[p, row(t)]) Q_i^T`` in place (``s`` the shrink's partials ``[S, T,
    R_MAX]``; ``Q`` B ``[L, N, R]``, or A read as ``[L, K, R]``)."""
    num_tokens, width = out.shape
    num_slots, (splits, _, r_max) = ranks.shape[0], s.shape
    tile = configs.expand_tile(num_tokens, r_max)
    multi_lora_expand_kernel[(seg.tile_adapter.shape[0], cdiv(width, tile.block_n))](
        out, q, ranks, seg.order, seg.tile_adapter, seg.tile_row, seg.seg_end, s,
        width, num_slots, r_max, out.stride(0), *q_strides, splits, s.stride(0),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_R=tile.block_r,
        PRECISION=precision(out.dtype), SUM_SPLITS=splits > 1, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )


def _a_strides(lora_a: torch.Tensor) -> tuple[int, int, int]:
    """A ``[L, R, K]`` as the shrink's Q ``(slot, rank, reduction)``."""
    return lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)


def _b_as_rank_rows(lora_b: torch.Tensor) -> tuple[int, int, int]:
    """B ``[L, N, R]`` read as ``[L, R, N]`` (the shrink's Q for ``dS = dY B``)."""
    return lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)


def multi_lora_segments_add(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
) -> None:
    """Prefill / training forward: the same in-place update as ``multi_lora_decode`` (same
    arguments and semantics), with the tokens sorted by adapter on the device and run in
    tiles of rows that share an adapter (``segments``), so tensor cores do the rank-r
    products. Returns None."""
    num_tokens = x.shape[0]
    num_slots, r_max, _ = lora_a.shape
    if num_tokens == 0 or num_slots == 0:
        return
    with on_device_of(x):
        seg = segments(adapter_ids, num_slots, configs.segment_block_m(num_tokens))
        splits = configs.segment_shrink_splits(seg.tile_adapter.shape[0], num_tokens, r_max, x.shape[1], x.device)
        s = _shrink(x, lora_a, _a_strides(lora_a), scalings, ranks, seg, r_max, splits)
        _expand(y, s, lora_b, (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)), ranks, seg)


def _wgrad(
    lhs: torch.Tensor, x: torch.Tensor, ranks: torch.Tensor, seg: Segments, out: torch.Tensor,
    out_strides: tuple[int, int, int],
) -> torch.Tensor:
    """``out[i] = lhs_i^T X_i`` per slot (``multi_lora_wgrad_kernel``); zeros for absent slots."""
    width = x.shape[1]
    num_slots, r_max = ranks.shape[0], lhs.shape[1]
    tile = configs.wgrad_tile(r_max)
    multi_lora_wgrad_kernel[(num_slots, cdiv(r_max, tile.block_r), cdiv(width, tile.block_n))](
        lhs, x, ranks, seg.order, seg.seg_start, seg.seg_end, out,
        width, num_slots, r_max, x.stride(0), *out_strides,
        BLOCK_M=tile.block_m, BLOCK_R=tile.block_r, BLOCK_C=tile.block_n,
        PRECISION=precision(x.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out


def multi_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    dx: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The LoRA part of the backward, arguments as in the module's contract plus ``grad_y
    [T, N]`` (x's dtype, unit column stride):

    - ``dx`` (``[T, K]``, x's dtype, holding ``dY W``) gets ``+= dS_i A_i`` in place, where
      ``dS = scalings[i] * dY B_i`` (fp32, never rounded);
    - returns ``(dA [L, R_MAX, K], dB [L, N, R_MAX])`` in the adapters' dtype (None unless
      asked for): ``dA_i = dS_i^T x_i``, ``dB_i = dY_i^T (scalings[i] x_i A_i^T)``, zero for
      slots no token uses and in the padding past ``r_i``. One program per output tile sums
      its adapter's tokens in sorted (token) order: deterministic, no atomics.
    """
    num_tokens, k = x.shape
    num_slots, r_max, _ = lora_a.shape
    n = lora_b.shape[1]
    da = db = None
    if num_tokens == 0:  # no token: dX has nothing to add, every slot's gradient is zero
        zeros = (lora_a.new_zeros(lora_a.shape), lora_b.new_zeros(lora_b.shape))
        return zeros[0] if need_a else None, zeros[1] if need_b else None
    with on_device_of(x):
        seg = segments(adapter_ids, num_slots, configs.segment_block_m(num_tokens))
        if dx is not None or need_a:
            # One split (the shrinks here): the dA and dB passes read dS and s whole, not partials.
            ds = _shrink(grad_y, lora_b, _b_as_rank_rows(lora_b), scalings, ranks, seg, r_max)
            if dx is not None:
                # dX += dS A_i: A [L, R, K] read as [L, K, R].
                _expand(dx, ds, lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), ranks, seg)
            if need_a:
                out = launch_device.empty_output((num_slots, r_max, k), lora_a.dtype, x.device)
                da = _wgrad(ds[0], x, ranks, seg, out, (r_max * k, k, 1))
        if need_b:
            s = _shrink(x, lora_a, _a_strides(lora_a), scalings, ranks, seg, r_max)
            out = launch_device.empty_output((num_slots, n, r_max), lora_b.dtype, x.device)
            db = _wgrad(s[0], grad_y, ranks, seg, out, (n * r_max, 1, r_max))
    return da, db
