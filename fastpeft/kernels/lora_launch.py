"""Launchers of the LoRA linear Triton kernels: allocate outputs, pick a plan, launch.

Inputs are 2-D with arbitrary strides (no copies); outputs are fresh contiguous tensors.
Nothing here reads device memory on the host, so the path can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from fastpeft.backend import interpreting
from fastpeft.kernels.lora_configs import GROUP_M, BackwardPlan, block_r, cdiv, plan_backward, plan_forward
from fastpeft.kernels.lora_kernels import (
    lora_bwd_da_kernel,
    lora_bwd_dx_kernel,
    lora_bwd_dy_kernel,
    lora_fwd_kernel,
    lora_shrink_kernel,
)
from fastpeft.kernels.philox_dropout import keep_mask_kernel
from fastpeft.ops.dropout_mask import dropout_threshold


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output the kernels fully overwrite is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _numerics(dtype: torch.dtype) -> dict:
    """Constexprs fixing how tiles of activation dtype ``dtype`` meet the tensor cores.

    fp16 and bf16 use their own tensor-core path with fp32 accumulation. fp32 reaches the
    kernels only in the interpreter (on a GPU it takes the torch path), with IEEE products.
    Under the interpreter, bf16 is computed in fp32 (its bf16 arithmetic is wrong;
    KERNEL_NOTES.md).
    """
    upcast = interpreting() and dtype == torch.bfloat16
    return {"UPCAST": upcast, "PRECISION": "ieee" if (dtype == torch.float32 or upcast) else "tf32"}


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    if dropout_p == 0.0:
        return 0, 1.0
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [M, N] in x.dtype, s [M, R] fp32)`` for 2-D x ``[M, K]`` (M >= 1)."""
    m, k = x.shape
    n, rank = weight.shape[0], lora_a.shape[0]
    plan = plan_forward(m, n, k, rank, dropout_p > 0.0, x.device)
    r_block = block_r(rank)
    numerics = _numerics(x.dtype)
    y = _empty((m, n), x.dtype, x.device)
    s = _empty((m, rank), torch.float32, x.device)
    parts, num_parts = s, 0
    if plan.fuse_shrink and dropout_p > 0.0:
        raise RuntimeError("internal: the fused-shrink forward cannot apply dropout")
    if not plan.fuse_shrink:
        threshold, keep_scale = _dropout_args(dropout_p)
        num_parts = plan.shrink_splits
        parts = _empty((num_parts, m, r_block), torch.float32, x.device)
        lora_shrink_kernel[(cdiv(m, plan.shrink.block_m), num_parts)](
            x, lora_a, parts, seed,
            m, k, rank, plan.k_per_split,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
            threshold, keep_scale,
            HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=plan.shrink.block_m, BLOCK_K=plan.shrink.block_k,
            BLOCK_R=r_block, num_warps=plan.shrink.num_warps, num_stages=plan.shrink.num_stages,
            **numerics,
        )
    g = plan.gemm
    lora_fwd_kernel[(cdiv(m, g.block_m) * cdiv(n, g.block_n),)](
        x, weight, bias if bias is not None else y, lora_a, lora_b, parts, s, y,
        m, n, k, rank, num_parts,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        scaling,
        HAS_BIAS=bias is not None, FUSE_SHRINK=plan.fuse_shrink,
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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX [M, K], dA [R, K], dB [N, R])``, each None unless asked for; 2-D grad_y ``[M, N]``."""
    m, k = x.shape
    n, rank = weight.shape[0], lora_a.shape[0]
    plan = plan_backward(m, n, k, rank, dropout_p > 0.0, x.device)
    r_block = block_r(rank)
    numerics = _numerics(x.dtype)
    threshold, keep_scale = _dropout_args(dropout_p)
    ds, db = lora_dy_pass(grad_y, lora_b, s, scaling, plan)
    dx = da = None
    if need_x:
        dx = _empty((m, k), x.dtype, x.device)
        g = plan.dx
        lora_bwd_dx_kernel[(cdiv(m, g.block_m) * cdiv(k, g.block_n),)](
            grad_y, weight, lora_a, ds, seed, dx,
            m, n, k, rank,
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            lora_a.stride(0), lora_a.stride(1),
            threshold, keep_scale,
            HAS_DROPOUT=dropout_p > 0.0,
            BLOCK_M=g.block_m, BLOCK_K=g.block_n, BLOCK_N=g.block_k, BLOCK_R=r_block, GROUP_M=GROUP_M,
            num_warps=g.num_warps, num_stages=g.num_stages, **numerics,
        )
    if need_a:
        da = lora_da_pass(x, ds, seed, dropout_p, plan)
    return (
        dx,
        da.to(lora_a.dtype) if need_a else None,
        db.to(lora_b.dtype) if need_b else None,
    )


def lora_dy_pass(
    grad_y: torch.Tensor, lora_b: torch.Tensor, s: torch.Tensor, scaling: float, plan: BackwardPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over dY ``[M, N]`` (``lora_bwd_dy_kernel``): ``(dS [M, R], dB [N, R])``, both
    fp32, ``dS = scaling * dY B`` and ``dB = scaling * dY^T s`` for the forward's fp32 ``s``."""
    m, n = grad_y.shape
    rank = s.shape[1]
    ds = torch.zeros((m, rank), device=grad_y.device, dtype=torch.float32)
    db = torch.zeros((n, rank), device=grad_y.device, dtype=torch.float32)
    p = plan.dy_pass
    lora_bwd_dy_kernel[(cdiv(m, p.block_m), plan.split_n)](
        grad_y, lora_b, s, ds, db,
        m, n, rank, plan.split_n,
        grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1),
        scaling,
        BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_R=block_r(rank),
        num_warps=p.num_warps, num_stages=p.num_stages, **_numerics(grad_y.dtype),
    )
    return ds, db


def lora_da_pass(
    x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, dropout_p: float, plan: BackwardPlan,
) -> torch.Tensor:
    """``dA [R, K] = dS^T x_hat`` (fp32) from one pass over x ``[M, K]`` (``lora_bwd_da_kernel``),
    the dropout mask regenerated from ``seed``; ``dS`` is ``lora_dy_pass``'s."""
    m, k = x.shape
    rank = ds.shape[1]
    threshold, keep_scale = _dropout_args(dropout_p)
    da = torch.zeros((rank, k), device=x.device, dtype=torch.float32)
    t = plan.da
    lora_bwd_da_kernel[(cdiv(m, t.block_m), cdiv(k, t.block_n))](
        x, ds, seed, da,
        m, k, rank,
        x.stride(0), x.stride(1),
        threshold, keep_scale,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=t.block_m, BLOCK_K=t.block_n, BLOCK_R=block_r(rank),
        num_warps=t.num_warps, num_stages=t.num_stages, **_numerics(x.dtype),
    )
    return da


# Tile of the mask-writing kernel; any power-of-two multiple of 4 works (tests only).
_MASK_TILE = 32


def dropout_keep_mask(seed: torch.Tensor, m: int, k: int, dropout_p: float) -> torch.Tensor:
    """The bool keep-mask ``[m, k]`` the kernels draw for ``seed`` (a 1-element int64 tensor)."""
    out = _empty((m, k), torch.int8, seed.device)
    if m and k:
        keep_mask_kernel[(cdiv(m, _MASK_TILE), cdiv(k, _MASK_TILE))](
            seed, out, m, k, dropout_threshold(dropout_p), BLOCK_M=_MASK_TILE, BLOCK_K=_MASK_TILE,
        )
    return out.bool()
