"""Launchers of the cuBLAS-hybrid LoRA path: cuBLAS runs the base GEMMs and accumulates onto
a LoRA term that Triton writes (kernels in ``lora_hybrid_kernels.py``).

    forward   y = bias + scaling * s B^T        (Triton, also writes s = x_hat A^T; up to
                                                 SPLIT_SHRINK_MAX_M rows the fused path's
                                                 K-split shrink, then its split-K epilogue
                                                 kernel as a write-only expand)
              y += x W^T                        (cuBLAS: y.addmm_(x, W^T), beta = 1)
    backward  dS = scaling dY B, dB             (Triton: the fused path's passes,
                                                 fastpeft.kernels.lora.launch.lora_backward)
              dX = D * (dS A) / (1-p)           (Triton, mask regenerated from the seed)
              dX += dY W                        (cuBLAS: dx.addmm_(dY, W))
              dA = dS^T x_hat                   (Triton: the fused path's pass over x)

Same contract and argument conventions as the fused launchers (``fastpeft.kernels.lora.launch``, whose helpers
these use): 2-D inputs with any strides (on a GPU, A, B and the bias are copied when they
would not launch the specialization ``fastpeft check`` compiles; x and W are the dispatcher's
business, ``fastpeft.kernels.lora.configs.kernel_friendly``), fresh contiguous outputs (allocated through
``launch_device.empty_output``, which the tests poison), ``s`` fp32 ``[M, R]``, the dropout mask drawn
from the seed and never saved, launches on the tensors' device, no host sync (CUDA-graph
capturable). Every tile chosen here is compiled by ``fastpeft check`` (``hybrid_kernel_specs``; the
fused path's kernels by ``lora_kernel_specs``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from fastpeft.kernels.lora import launch as lora_launch
from fastpeft.kernels.aot_spec import KernelSpec
from fastpeft.kernels import launch_device
from fastpeft.kernels.launch_device import on_device_of
from fastpeft.kernels.lora.configs import (
    BLOCK_R_CHOICES,
    GROUP_M,
    BackwardPlan,
    DECODE_MAX_M,
    MEDIUM_MAX_M,
    PROGRAMS_PER_SM,
    TileConfig,
    block_r,
    cdiv,
    device_info,
    plan_forward,
    split_epilogue_tile,
    split_reduction,
)
from fastpeft.kernels.lora.hybrid_kernels import lora_hybrid_dx_kernel, lora_hybrid_fwd_kernel
from fastpeft.kernels.lora.kernels import lora_fwd_split_epilogue_kernel

# Forward kernel tiles: BLOCK_M rows, BLOCK_N columns of y per step of the expand loop, BLOCK_K
# columns of x per step of the shrink loop. The kernel is bandwidth-bound (read x, write y).
# Up to MEDIUM_MAX_M rows, 16-row tiles (the smallest tl.dot) give 4x the row tiles of 64-row
# ones, so fewer programs have to re-read a row tile of x to fill the GPU. BLOCK_K 64, 3
# stages: small programs (<= 96 registers, <= 40 KB of shared memory), several per SM; BLOCK_K
# 128 spills with dropout and fp32 adapters at rank 16 on sm_80 (fastpeft check).
_FWD_SMALL_M = TileConfig(16, 64, 64, 4, 3)
# Larger M: 64-row tiles, a 64 x 128 fp32 y accumulator (64 registers a thread at 4 warps);
# 3 stages of 64 x 64 x and A tiles (8 + 16 KB with fp32 A at rank 64).
_FWD_LARGE_M = TileConfig(64, 128, 64, 4, 3)
# At most this many programs share one row tile of x: each re-reads it and A (from L2, since
# they run together), so the split trades re-reads for parallelism. 8 caps the extra reads
# at 7 row tiles of x per row tile of y written; a guess, to be tuned on a GPU.
MAX_SPLIT_N = 8
# Up to this many rows (decode) hybrid_forward runs the fused path's K-split shrink and then a
# write-only expand (_split_shrink_forward) instead of lora_hybrid_fwd_kernel. That kernel
# gives each program the whole K loop on a 16-row tile: at M <= 16 its grid is 8 programs (one
# row tile x MAX_SPLIT_N), each re-reading all of A. The bound is from `fastpeft plan`'s
# estimates (H100, K = 4096, N = 4096 / 14336, ranks 8 / 16 / 64; no GPU has run either path):
# at M = 1 and 16 the split path is up to 20 us faster (rank 64, N = 14336) and at most 3 us
# slower (rank 8, N = 4096: its second launch, 4 us eager, is most of that); at M = 64 it is
# 1-4 us slower at N = 4096 and at M = 512 slower everywhere (1.7-7 us): from 17 rows on, the
# 16-row tiles already give 32+ programs and the extra launch costs more than the re-reads
# of A, which stay in L2.
SPLIT_SHRINK_MAX_M = DECODE_MAX_M
# Fewest K-steps per split of that shrink: each expand program sums all the partials for its
# rows one after another, so 1-step splits (32 partials at K = 4096) trade a long chain of
# loads for a grid the plan estimates at most 1.4 us faster; 2 halves the chain. The fused
# path's MIN_STEPS_PER_SPLIT (8) leaves M <= 16 with 4 programs at K = 4096 (plan: up to 10 us
# slower at rank 64).
SHRINK_MIN_STEPS = 2
# dX's LoRA term: one 64 x 128 output tile per program, a single rank-r dot (no loop, so no
# pipelining stages); a write-bound kernel.
_DX = TileConfig(64, 128, 0, 4, 1)


def forward_tile(m: int) -> TileConfig:
    """The forward kernel's tile for ``m`` rows."""
    return _FWD_SMALL_M if m <= MEDIUM_MAX_M else _FWD_LARGE_M


def forward_split(m: int, n: int, tile: TileConfig, num_sms: int) -> int:
    """Programs per row tile (each writes every ``split``-th column tile of y): enough for
    ``PROGRAMS_PER_SM`` programs per SM, at most one per column tile and ``MAX_SPLIT_N``."""
    wanted = cdiv(PROGRAMS_PER_SM * num_sms, cdiv(m, tile.block_m))
    return max(1, min(wanted, cdiv(n, tile.block_n), MAX_SPLIT_N))


def hybrid_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [M, N] in x.dtype, s [M, R] fp32)`` for 2-D x ``[M, K]`` (M, N, K >= 1):
    ``y = x W^T + bias + scaling * s B^T`` with ``s = x_hat A^T``."""
    m, k = x.shape
    if m <= SPLIT_SHRINK_MAX_M:
        return _split_shrink_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    n, rank = weight.shape[0], lora_a.shape[0]
    tile = forward_tile(m)
    split = forward_split(m, n, tile, device_info(x.device)[0])
    threshold, keep_scale = launch_device.dropout_args(dropout_p)
    with on_device_of(x):
        y = launch_device.empty_output((m, n), x.dtype, x.device)
        s = launch_device.empty_output((m, rank), torch.float32, x.device)
        bias = lora_launch.launchable_bias(bias, y)
        lora_a, lora_b = lora_launch.launchable(lora_a), lora_launch.launchable(lora_b, row_strides=False)
        lora_hybrid_fwd_kernel[(cdiv(m, tile.block_m) * split,)](
            x, lora_a, lora_b, bias, seed, s, y,
            m, n, k, rank, split,
            *lora_launch.strides2d(x), *lora_launch.strides2d(lora_a),
            lora_b.stride(0), lora_launch.strides2d(lora_b)[1],
            scaling, threshold, keep_scale,
            HAS_BIAS=bias is not y, HAS_DROPOUT=dropout_p > 0.0,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, BLOCK_R=block_r(rank),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
            **launch_device.kernel_numerics(x.dtype, lora_a.dtype),
        )
        y.addmm_(x, weight.t())
    return y, s


def _split_shrink_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scaling: float, dropout_p: float, seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hybrid_forward`` up to ``SPLIT_SHRINK_MAX_M`` rows. First the fused path's shrink
    kernel (``lora_launch.shrink_partials``) on ``plan_forward``'s shrink tile, split over K
    into ranges of at least ``SHRINK_MIN_STEPS`` steps for up to PROGRAMS_PER_SM programs per
    SM, the dropout mask drawn there at the same counters. Then a write-only expand: the fused
    path's split-K epilogue kernel with no GEMM partials (``num_splits = 0``), each program
    summing the shrink's partials for its rows in a fixed order, storing ``s`` (first column
    tile) and writing ``bias + scaling * s B^T`` for its tile of y (B read once per row tile,
    no K loop). Then cuBLAS adds ``x W^T``."""
    m, k = x.shape
    n, rank = weight.shape[0], lora_a.shape[0]
    _, keep_scale = launch_device.dropout_args(dropout_p)
    with on_device_of(x):
        plan = plan_forward(m, n, k, rank, dropout_p > 0.0, x.device, a_bytes=lora_a.element_size(),
                            w_bytes=weight.element_size())
        y = launch_device.empty_output((m, n), x.dtype, x.device)
        s = launch_device.empty_output((m, rank), torch.float32, x.device)
        has_bias, bias = bias is not None, lora_launch.launchable_bias(bias, y)
        lora_a, lora_b = lora_launch.launchable(lora_a), lora_launch.launchable(lora_b, row_strides=False)
        shrink = plan.shrink
        split = split_reduction(k, shrink.block_k, cdiv(PROGRAMS_PER_SM * device_info(x.device)[0],
                                                        cdiv(m, shrink.block_m)), SHRINK_MIN_STEPS)
        parts = lora_launch.shrink_partials(x, lora_a, seed, keep_scale, dropout_p, shrink, split)
        e = split_epilogue_tile()
        # parts stands in for the (absent) GEMM partials and DoRA's scale (fp32 pointers), y for
        # DoRA's u: never read or written (no split, HAS_SCALE off).
        lora_fwd_split_epilogue_kernel[(cdiv(m, e.block_m) * cdiv(n, e.block_n),)](
            parts, bias, lora_b, parts, s, y, parts, y,
            m, n, rank, 0, split.count,
            lora_b.stride(0), lora_launch.strides2d(lora_b)[1], scaling,
            HAS_BIAS=has_bias, HAS_SCALE=False, BLOCK_M=e.block_m, BLOCK_N=e.block_n, BLOCK_R=block_r(rank),
            GROUP_M=GROUP_M,
            num_warps=e.num_warps, num_stages=e.num_stages, **launch_device.kernel_numerics(x.dtype, lora_a.dtype),
        )
        y.addmm_(x, weight.t())
    return y, s


def hybrid_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX [M, K], dA [R, K], dB [N, R])``, each None unless asked for; 2-D grad_y ``[M, N]``
    and the forward's fp32 ``s``: the fused path's backward (``fastpeft.kernels.lora.launch.lora_backward``,
    which skips the passes a gradient not asked for needs) with dX formed by ``_hybrid_dx``."""
    return lora_launch.lora_backward(
        grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_x, need_a, need_b, dx=_hybrid_dx,
    )


def _hybrid_dx(
    grad_y: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor,
    dropout_p: float, plan: BackwardPlan,
) -> torch.Tensor:
    """``dX = D * (dS A) / (1-p)`` written by Triton (mask regenerated from ``seed``), then
    ``dX += dY W`` by cuBLAS accumulating onto it; in dY's dtype."""
    m, k, rank = grad_y.shape[0], weight.shape[1], lora_a.shape[0]
    threshold, keep_scale = launch_device.dropout_args(dropout_p)
    dx = launch_device.empty_output((m, k), grad_y.dtype, grad_y.device)
    lora_hybrid_dx_kernel[(cdiv(m, _DX.block_m), cdiv(k, _DX.block_n))](
        ds, lora_a, seed, dx,
        m, k, rank,
        *lora_launch.strides2d(lora_a),
        threshold, keep_scale,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=_DX.block_m, BLOCK_K=_DX.block_n, BLOCK_R=block_r(rank),
        num_warps=_DX.num_warps, num_stages=_DX.num_stages, **launch_device.kernel_numerics(grad_y.dtype, lora_a.dtype),
    )
    return dx.addmm_(grad_y, weight)


# (activation, LoRA weight) dtypes compiled by ``fastpeft check``. The expand and dX dots
# run in the adapter's dtype (``tile_utils.rank_dot``), so fp32 adapters (tf32 dots) and 16-bit
# adapters (16-bit dots) are different code, for both 16-bit activations. fp32 activations
# never reach the kernels on a GPU (``fastpeft.kernels.lora.dispatch.choose_implementation``).
HYBRID_DTYPE_CASES = (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp16", "fp16"))
# ``fastpeft.kernels.launch_device.kernel_numerics`` of 16-bit activations on a GPU: native tensor-core dots, tf32 for
# fp32 operands.
GPU_NUMERICS = {"UPCAST": False, "PRECISION": "tf32"}


def forward_tile_choices() -> list[TileConfig]:
    """Every tile ``forward_tile`` can return."""
    return [_FWD_SMALL_M, _FWD_LARGE_M]


def dx_tile() -> TileConfig:
    """The tile of the dX LoRA-term kernel."""
    return _DX


def hybrid_kernel_specs(spec: Callable[..., KernelSpec]) -> list[KernelSpec]:
    """Every configuration of the two hybrid kernels, for ``fastpeft check``.

    ``spec`` is ``lora_specs``'s builder (``spec(fn, name, act, lora, constexprs, tile,
    wgmma=...)``), so the signatures follow the same conventions as the fused kernels' specs
    (unit strides as constexprs, everything else aligned to 16). Bias is compiled on only (a
    superset of the code without it). The 64-row tiles (one 4-warp warpgroup per 64 rows) must
    use Hopper's wgmma on sm_90. The dY and dA passes are the fused path's kernels with the
    fused path's tiles (``plan_backward``): ``lora_kernel_specs`` compiles them already.
    """
    specs = []
    for (act, lora), r, drop in itertools.product(HYBRID_DTYPE_CASES, BLOCK_R_CHOICES, (False, True)):
        for t in forward_tile_choices():
            specs.append(spec(
                lora_hybrid_fwd_kernel, "lora_hybrid_fwd", act, lora,
                {"HAS_BIAS": True, "HAS_DROPOUT": drop, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n,
                 "BLOCK_K": t.block_k, "BLOCK_R": r, **GPU_NUMERICS},
                t, wgmma=t.block_m >= 64))
        specs.append(spec(
            lora_hybrid_dx_kernel, "lora_hybrid_dx", act, lora,
            {"HAS_DROPOUT": drop, "BLOCK_M": _DX.block_m, "BLOCK_K": _DX.block_n, "BLOCK_R": r, **GPU_NUMERICS},
            _DX, wgmma=_DX.block_m >= 64))
    return specs
