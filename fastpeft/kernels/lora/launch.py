"""Launchers of the LoRA linear Triton kernels: allocate outputs, pick a plan, launch.

Inputs are 2-D with arbitrary strides (no copies, except of the gradient dY and of the small
operands A, B and the bias when a GPU launch could not take them as aligned rows:
``launchable``); outputs are fresh contiguous tensors. Every launch runs
on its tensors' device (``on_device_of``), not on torch's current one. Nothing here reads
device memory on the host, so the path can be captured in a CUDA graph. No kernel uses
atomics (``fastpeft.kernels.lora.kernels``): every result is bitwise reproducible, so
``torch.use_deterministic_algorithms(True)`` needs no other mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from fastpeft.kernels import launch_device
from fastpeft.kernels.dropout_mask import dropout_threshold
from fastpeft.kernels.launch_device import dropout_args, kernel_numerics, on_device_of
from fastpeft.kernels.lora.configs import (
    GROUP_M,
    TMA_PROGRAMS_PER_SM,
    BackwardPlan,
    Split,
    TileConfig,
    aligned_rows,
    block_r,
    cdiv,
    device_info,
    plan_backward,
    plan_forward,
    reduce_tile,
    split_epilogue_tile,
    tma_requested,
)
from fastpeft.kernels.lora.kernels import (
    lora_bwd_dx_kernel,
    lora_bwd_dx_split_epilogue_kernel,
    lora_bwd_wgrad_kernel,
    lora_fwd_kernel,
    lora_fwd_split_epilogue_kernel,
    lora_fwd_tma_kernel,
    lora_gemm_split_kernel,
    lora_shrink_kernel,
    sum_partials_kernel,
)
from fastpeft.kernels.philox_dropout import keep_mask_kernel


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for the rank-r passes, whose operands are fp32 (widened
    from ``dtype``): tf32 tensor cores on a GPU, IEEE where ``kernel_numerics`` says so."""
    return kernel_numerics(dtype, dtype)["PRECISION"]


def strides2d(t: torch.Tensor) -> tuple[int, int]:
    """2-D ``t``'s strides as passed to a kernel: a dimension of size 1 gets the stride of a
    contiguous tensor (its own is never used, and may be anything), so such a launch gets the
    same specialization as every other (``fastpeft.kernels.lora.configs.aligned_for_kernels``)."""
    rows, cols = t.shape
    return (t.stride(0) if rows > 1 else cols, t.stride(1) if cols > 1 else 1)


# TMA's alignment: a tensor descriptor's base address and row stride must be multiples of
# 16 bytes (cuTensorMapEncodeTiled; Triton's TensorDescriptor asserts the same).
TMA_ALIGN = 16


def tma_ready(t: torch.Tensor) -> bool:
    """Whether 2-D ``t`` can back a TMA descriptor (``tensor_descriptor``): unit inner stride,
    base address and row stride (as ``strides2d`` passes it) multiples of TMA_ALIGN bytes. The
    TMA forward falls back to ``lora_fwd_kernel`` when x or W is not."""
    row_stride, col_stride = strides2d(t)
    return col_stride == 1 and t.data_ptr() % TMA_ALIGN == 0 and row_stride * t.element_size() % TMA_ALIGN == 0


def tensor_descriptor(t: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor:
    """A host-side TMA descriptor of 2-D ``t`` (``tma_ready``) loading ``[block_rows,
    block_cols]`` tiles, zero-filled past its edges. Built on the host and passed by value to
    the kernel, so no device-side allocator (``triton.set_allocator``) is involved."""
    return TensorDescriptor(t, list(t.shape), list(strides2d(t)), [block_rows, block_cols])


def launchable(t: torch.Tensor, row_strides: bool = True) -> torch.Tensor:
    """``t``, or a contiguous copy when a GPU launch would not get the specialization
    ``fastpeft check`` compiles (``fastpeft.kernels.lora.configs.aligned_rows``): dY (e.g. the zero-stride
    gradient of ``y.sum()``), A and B (a few KB). The interpreter takes any strides."""
    if t.device.type != "cuda" or aligned_rows(t, row_strides):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def launchable_bias(bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """The bias argument: y when there is none (never read), else the bias contiguous (the
    kernels read bias[n] at n) and, on a GPU, aligned (a copy of N elements if need be)."""
    if bias is None:
        return y
    if bias.is_contiguous():
        return launchable(bias, row_strides=False)
    return bias.clone(memory_format=torch.contiguous_format)


def _sum_partials(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``parts [count, *shape]`` (fp32) summed in order over the first dimension, in ``dtype``."""
    if parts.shape[0] == 1:
        return parts[0].to(dtype)
    out = launch_device.empty_output(parts.shape[1:], dtype, parts.device)
    numel, t = out.numel(), reduce_tile()
    sum_partials_kernel[(cdiv(numel, t.block_m),)](
        parts, out, numel, parts.shape[0], BLOCK=t.block_m, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out


def shrink_partials(
    x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, scale: float, dropout_p: float,
    tile: TileConfig, split: Split,
) -> torch.Tensor:
    """``scale * x_hat a^T`` as fp32 partials ``[split.count, M, R]`` (``lora_shrink_kernel``):
    the fused forward's separate shrink, dS in the backward, and the hybrid forward's shrink
    (``fastpeft.kernels.lora.hybrid_launch``)."""
    m, k = x.shape
    rank = a.shape[0]
    threshold, _ = dropout_args(dropout_p)
    parts = launch_device.empty_output((split.count, m, rank), torch.float32, x.device)
    lora_shrink_kernel[(cdiv(m, tile.block_m), split.count)](
        x, a, parts, seed,
        m, k, rank, split.length,
        *strides2d(x), *strides2d(a),
        scale, threshold,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=tile.block_m, BLOCK_K=tile.block_k, BLOCK_R=block_r(rank),
        PRECISION=_precision(x.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return parts


def _gemm_split(
    p: torch.Tensor, q: torch.Tensor, q_strides: tuple[int, int], n: int, tile: TileConfig, split: Split,
    numerics: dict,
) -> torch.Tensor:
    """fp32 partials ``[split.count, M, n]`` of ``P Q^T`` for P ``[M, RED]`` and Q viewed as
    ``[n, RED]`` with strides ``q_strides`` (``lora_gemm_split_kernel``)."""
    m, red = p.shape
    parts = launch_device.empty_output((split.count, m, n), torch.float32, p.device)
    lora_gemm_split_kernel[(cdiv(m, tile.block_m) * cdiv(n, tile.block_n), split.count)](
        p, q, parts,
        m, n, red, split.length,
        *strides2d(p), *q_strides,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_RED=tile.block_k, GROUP_M=GROUP_M,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **numerics,
    )
    return parts


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    tma: bool = False,
    dora_scale: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [M, N] in x.dtype, s [M, R] fp32)`` for 2-D x ``[M, K]`` (M >= 1).

    ``tma`` (the dispatch table's ``fused-tma``) or ``FASTPEFT_LORA_TMA=1``: run the GEMM as
    ``lora_fwd_tma_kernel`` where ``plan_forward`` allows it and x and W are ``tma_ready``.
    ``dora_scale`` (fp32 ``[N]``, contiguous) with ``u`` (``[M, N]`` in x's dtype): DoRA's
    epilogue, ``y = dora_scale * (x W^T + scaling s B^T) + bias``, the unscaled sum written to
    ``u`` (the kernels' ``HAS_SCALE``)."""
    m, k = x.shape
    n, rank = weight.shape[0], lora_a.shape[0]
    with on_device_of(x):
        tma = (tma or tma_requested()) and tma_ready(x) and tma_ready(weight)
        has_scale = dora_scale is not None
        plan = plan_forward(m, n, k, rank, dropout_p > 0.0, x.device, a_bytes=lora_a.element_size(),
                            w_bytes=weight.element_size(), tma=tma, scaled=has_scale)
        r_block = block_r(rank)
        numerics = kernel_numerics(x.dtype, lora_a.dtype)
        y = launch_device.empty_output((m, n), x.dtype, x.device)
        s = launch_device.empty_output((m, rank), torch.float32, x.device)
        has_bias, bias = bias is not None, launchable_bias(bias, y)
        # without DoRA's scale, s (fp32) and y (x's dtype) stand in for the pointers HAS_SCALE
        # would read and write: never dereferenced, but of the dtypes the compiled kernels take
        dora_scale, u = (dora_scale, u) if has_scale else (s, y)
        lora_a, lora_b = launchable(lora_a), launchable(lora_b, row_strides=False)
        if plan.fuse_shrink and dropout_p > 0.0:
            raise RuntimeError("internal: the fused-shrink forward cannot apply dropout")
        parts, num_parts = s, 0
        if not plan.fuse_shrink:
            _, keep_scale = dropout_args(dropout_p)
            parts = shrink_partials(x, lora_a, seed, keep_scale, dropout_p, plan.shrink, plan.shrink_split)
            num_parts = plan.shrink_split.count
        g = plan.gemm
        b_args = (lora_b.stride(0), strides2d(lora_b)[1])
        if plan.gemm_split.count > 1:
            gemm_parts = _gemm_split(x, weight, strides2d(weight), n, g, plan.gemm_split, numerics)
            e = split_epilogue_tile()
            lora_fwd_split_epilogue_kernel[(cdiv(m, e.block_m) * cdiv(n, e.block_n),)](
                gemm_parts, bias, lora_b, parts, s, y, dora_scale, u,
                m, n, rank, plan.gemm_split.count, num_parts,
                *b_args, scaling,
                HAS_BIAS=has_bias, HAS_SCALE=has_scale, BLOCK_M=e.block_m, BLOCK_N=e.block_n, BLOCK_R=r_block, GROUP_M=GROUP_M,
                num_warps=e.num_warps, num_stages=e.num_stages, **numerics,
            )
            return y, s
        num_tiles = cdiv(m, g.block_m) * cdiv(n, g.block_n)
        if plan.tma:
            programs = min(num_tiles, TMA_PROGRAMS_PER_SM * device_info(x.device)[0])
            lora_fwd_tma_kernel[(programs,)](
                tensor_descriptor(x, g.block_m, g.block_k), tensor_descriptor(weight, g.block_n, g.block_k),
                bias, lora_b, parts, s, y, dora_scale, u,
                m, n, k, rank, num_parts, programs,
                *b_args, scaling,
                HAS_BIAS=has_bias, HAS_SCALE=has_scale, BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, BLOCK_R=r_block,
                GROUP_M=GROUP_M, num_warps=g.num_warps, num_stages=g.num_stages, **numerics,
            )
            return y, s
        lora_fwd_kernel[(num_tiles,)](
            x, weight, bias, lora_a, lora_b, parts, s, y, dora_scale, u,
            m, n, k, rank, num_parts,
            *strides2d(x), *strides2d(weight), *strides2d(lora_a), *b_args,
            scaling,
            HAS_BIAS=has_bias, HAS_SCALE=has_scale, FUSE_SHRINK=plan.fuse_shrink,
            BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, BLOCK_R=r_block, GROUP_M=GROUP_M,
            num_warps=g.num_warps, num_stages=g.num_stages, **numerics,
        )
    return y, s


def lora_backward(
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
    *,
    dx: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX [M, K], dA [R, K], dB [N, R])``, each None unless asked for; 2-D grad_y ``[M, N]``.

    ``dx``: how dX is formed from ``(grad_y, weight, lora_a, dS, seed, dropout_p, plan)``;
    the fused GEMM (``_dx``) by default, the cuBLAS-hybrid path passes its own. The passes
    for dS, dA and dB are the same for both."""
    dx_fn = dx or _dx
    m, k = x.shape
    n, rank = weight.shape[0], lora_a.shape[0]
    dx = da = db = None
    with on_device_of(x):
        grad_y, lora_a, lora_b = launchable(grad_y), launchable(lora_a), launchable(lora_b, row_strides=False)
        plan = plan_backward(m, n, k, rank, dropout_p > 0.0, x.device)
        if need_b:
            db = _db_pass(grad_y, s, scaling, plan, lora_b.dtype)
        if not (need_x or need_a):
            return dx, da, db
        ds = _ds_pass(grad_y, lora_b, scaling, plan)
        if need_x:
            dx = dx_fn(grad_y, weight, lora_a, ds, seed, dropout_p, plan)
        if need_a:
            da = _da_pass(x, ds, seed, dropout_p, plan, lora_a.dtype)
    return dx, da, db


def _dx(
    grad_y: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor,
    dropout_p: float, plan: BackwardPlan,
) -> torch.Tensor:
    """``dX = dY W + D * (dS A) / (1-p)`` in dY's dtype: the fused GEMM, or its split-K and
    epilogue kernels."""
    m, n = grad_y.shape
    k, rank = weight.shape[1], lora_a.shape[0]
    threshold, keep_scale = dropout_args(dropout_p)
    numerics = kernel_numerics(grad_y.dtype, lora_a.dtype)
    dx = launch_device.empty_output((m, k), grad_y.dtype, grad_y.device)
    w_stride_n, w_stride_k = strides2d(weight)
    epilogue_args = (*strides2d(lora_a), threshold, keep_scale)
    epilogue_flags = {"HAS_DROPOUT": dropout_p > 0.0, "BLOCK_R": block_r(rank), "GROUP_M": GROUP_M, **numerics}
    g = plan.dx
    if plan.dx_split.count > 1:
        # W^T viewed as [K, N]: W's strides swapped.
        gemm_parts = _gemm_split(grad_y, weight, (w_stride_k, w_stride_n), k, g, plan.dx_split, numerics)
        e = split_epilogue_tile()
        lora_bwd_dx_split_epilogue_kernel[(cdiv(m, e.block_m) * cdiv(k, e.block_n),)](
            gemm_parts, lora_a, ds, seed, dx,
            m, k, rank, plan.dx_split.count,
            *epilogue_args,
            BLOCK_M=e.block_m, BLOCK_K=e.block_n, num_warps=e.num_warps, num_stages=e.num_stages, **epilogue_flags,
        )
        return dx
    lora_bwd_dx_kernel[(cdiv(m, g.block_m) * cdiv(k, g.block_n),)](
        grad_y, weight, lora_a, ds, seed, dx,
        m, n, k, rank,
        *strides2d(grad_y), w_stride_n, w_stride_k,
        *epilogue_args,
        BLOCK_M=g.block_m, BLOCK_K=g.block_n, BLOCK_N=g.block_k,
        num_warps=g.num_warps, num_stages=g.num_stages, **epilogue_flags,
    )
    return dx


def _no_seed(device: torch.device) -> torch.Tensor:
    """The seed argument of a launch without dropout: never read, but int64 like a real seed,
    so the launch has the signature ``fastpeft check`` compiles."""
    return torch.empty(0, dtype=torch.int64, device=device)


def _ds_pass(grad_y: torch.Tensor, lora_b: torch.Tensor, scaling: float, plan: BackwardPlan) -> torch.Tensor:
    """``dS [M, R] = scaling * dY B`` (fp32): the shrink kernel on dY and B^T (copied
    contiguous, a few KB, so that it loads like A in the forward), split over N."""
    parts = shrink_partials(
        grad_y, lora_b.t().contiguous(), _no_seed(grad_y.device), scaling, 0.0, plan.ds, plan.ds_split,
    )
    return _sum_partials(parts, torch.float32)


def weight_grad(
    lhs: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, scale: float, dropout_p: float, tile: TileConfig,
    split: Split, transposed: bool, dtype: torch.dtype, rank_block: int | None = None,
) -> torch.Tensor:
    """``scale * lhs^T x_hat`` (``lora_bwd_wgrad_kernel``) in ``dtype``: ``[R, C]``, or
    ``[C, R]`` when ``transposed``, for fp32 ``lhs [M, R]`` (contiguous) and ``x [M, C]``,
    summed over ``split``'s row ranges in order; ``x_hat`` is x with the dropout mask of
    ``seed``. ``rank_block``: the ranks a program owns (default all of R, padded; the
    bottleneck adapter's wide ranks run in blocks, which read x together)."""
    m, c = x.shape
    rank = lhs.shape[1]
    r_block = rank_block or block_r(rank)
    threshold, _ = dropout_args(dropout_p)
    shape, out_strides = ((c, rank), (1, rank)) if transposed else ((rank, c), (c, 1))
    parts = launch_device.empty_output((split.count, *shape), torch.float32, x.device)
    lora_bwd_wgrad_kernel[(cdiv(rank, r_block) * cdiv(c, tile.block_n), split.count)](
        lhs, x, seed, parts,
        m, c, rank, split.length,
        rank, *strides2d(x), *out_strides,
        scale, threshold,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=tile.block_m, BLOCK_C=tile.block_n, BLOCK_R=r_block,
        PRECISION=_precision(x.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return _sum_partials(parts, dtype)


def _da_pass(
    x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, dropout_p: float, plan: BackwardPlan, dtype: torch.dtype,
) -> torch.Tensor:
    """``dA [R, K] = dS^T x_hat`` in ``dtype``, the dropout mask regenerated from ``seed``."""
    _, keep_scale = dropout_args(dropout_p)
    return weight_grad(ds, x, seed, keep_scale, dropout_p, plan.wgrad, plan.da_split, False, dtype)


def _db_pass(
    grad_y: torch.Tensor, s: torch.Tensor, scaling: float, plan: BackwardPlan, dtype: torch.dtype,
) -> torch.Tensor:
    """``dB [N, R] = scaling * dY^T s`` in ``dtype`` for the forward's fp32 ``s``."""
    return weight_grad(s, grad_y, _no_seed(grad_y.device), scaling, 0.0, plan.wgrad, plan.db_split, True, dtype)


# Tile of the mask-writing kernel; any power-of-two multiple of 4 works (tests only).
_MASK_TILE = 32


def dropout_keep_mask(seed: torch.Tensor, m: int, k: int, dropout_p: float) -> torch.Tensor:
    """The bool keep-mask ``[m, k]`` the kernels draw for ``seed`` (a 1-element int64 tensor)."""
    out = launch_device.empty_output((m, k), torch.int8, seed.device)
    if m and k:
        with on_device_of(seed):
            keep_mask_kernel[(cdiv(m, _MASK_TILE), cdiv(k, _MASK_TILE))](
                seed, out, m, k, dropout_threshold(dropout_p), BLOCK_M=_MASK_TILE, BLOCK_K=_MASK_TILE,
            )
    return out.bool()
