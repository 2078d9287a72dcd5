"""The torch path of the DoRA linear op (``fastpeft.ops.dora_linear``): PEFT's DoRA as plain
torch ops, with the LoRA op's torch pieces for the low-rank side.

For a base ``W [N, K]``, bias ``b``, LoRA ``A [r, K]``, ``B [N, r]``, scaling ``s``, magnitude
``m [N]`` and ``x' = dropout(x)``:

    n = ||W + s B A||_row            (detached, as in the DoRA paper and PEFT)
    c = m / n
    u = x' W^T + s x' A^T B^T        [M, N]
    y = x W^T + b + c * u - x' W^T   (= c * u + b without dropout, where x' = x)

which is PEFT's ``y = x W^T + b + (c - 1) * (x' W^T) + c * s * (x' A^T B^T)``. The row norm
never forms ``B A`` ([N, K]): ``n_i^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T``
(``dora_row_norm``), one ``[N, K] x [K, r]`` product, with ``||W_i||^2`` of the frozen W
passed in when cached; the op computes it once per call and hands it to both passes. The backward needs ``u`` for ``dm = sum_rows(g * u) / n`` and keeps it
(``[M, N]`` in x's dtype; PEFT's autograd keeps two such tensors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastpeft.ops.lora_linear_torch import add_lora_product, keep_mask, lora_backward_torch, lora_rank_side


def dora_row_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``||W + scaling * B A||`` of each row, ``[N]`` in float32 (float64 for float64 inputs),
    without forming ``B A``: ``||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T``.
    ``weight_sq``: the ``[N]`` squared row norms of W, when the caller caches them (W is
    frozen). The sum is clamped at 0 before the square root (rounding of a near-zero row)."""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, lora_a.dtype), torch.float32)
    w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    squares = (w * w).sum(1) if weight_sq is None else weight_sq.to(dtype)
    cross = ((w @ a.t()) * b).sum(1)
    lora_sq = ((b @ (a @ a.t())) * b).sum(1)
    return (squares + (2.0 * scaling) * cross + (scaling * scaling) * lora_sq).clamp_min(0.0).sqrt()


def _dropped(x: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """``x'``: x with the dropped elements zeroed and the rest scaled by ``1 / (1 - p)``."""
    return x * keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))


def dora_forward_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [M, N], u [M, N], s [M, r], keep)`` for 2-D x ``[M, K]`` and the row norms ``norm``
    (module docstring): ``y`` and ``u`` in x's dtype, ``s = x' A^T`` as the LoRA op's torch
    path keeps it, ``keep`` the bool dropout mask (empty without dropout). The scale
    ``c = m / n`` and the sums are formed in the norm's dtype (float32; float64 inputs:
    float64) and ``y`` rounded once to x's dtype."""
    keep = keep_mask(x, dropout_p, seed)
    scale = magnitude.to(norm.dtype) / norm
    s = lora_rank_side(x, lora_a, dropout_p, keep)
    dropped = _dropped(x, keep, dropout_p) if keep.numel() else x
    v = dropped @ weight.t()
    u = add_lora_product(v.clone() if keep.numel() else v, (s * scaling).to(lora_b.dtype), lora_b.t())
    wide = norm.dtype
    # y = c * u + b (+ x W^T - x' W^T with dropout), each product in one fused pass
    y = torch.addcmul(bias.to(wide), u.to(wide), scale) if bias is not None else u.to(wide) * scale
    if keep.numel():  # the base on the undropped x, less the dropped one c * u holds
        y += (x @ weight.t()).to(wide) - v.to(wide)
    return y.to(x.dtype), u, s, keep


def dora_backward_torch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    keep: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_x: bool,
    need_a: bool,
    need_b: bool,
    need_m: bool,
    lora_gradients: Callable[..., tuple] = lora_backward_torch,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX [M, K], dA, dB, dm [N])`` for 2-D ``grad_y`` ``[M, N]``, each None unless asked
    for. With ``g_c = g * c``: the LoRA gradients are the LoRA op's for ``g_c``;
    ``dX = g_c W + s (g_c B) A`` without dropout, and with it ``g W + ((g_c - g) W + s (g_c B)
    A) * mask / (1 - p)``; ``dm = sum_rows(g * u) / n`` (the norm is detached).
    ``lora_gradients``: what computes the LoRA part, ``lora_backward_torch``'s signature (the
    op passes the LoRA backward kernels where its forward ran them)."""
    scale = magnitude.to(norm.dtype) / norm
    wide = grad_y.to(norm.dtype)
    grad_c = (wide * scale).to(grad_y.dtype)
    dm = ((wide * u.to(norm.dtype)).sum(0) / norm).to(magnitude.dtype) if need_m else None
    base_grad = None
    if need_x and keep.numel():
        # (c - 1) * g formed wide and rounded once: near c = 1 (DoRA's start) g * c - g cancels
        dropped_part = (wide * (scale - 1.0)).to(grad_y.dtype) @ weight
        base_grad = grad_y @ weight + _dropped(dropped_part, keep, dropout_p)
    dx, da, db = lora_gradients(grad_c, x, weight, lora_a, lora_b, s, keep, scaling, dropout_p,
                                need_x, need_a, need_b, base_grad=base_grad)
    return dx, da, db, dm


def dora_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor,
                     norm: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """``dW [N, K]`` in W's dtype for 2-D ``grad_y`` and x, the norm detached: ``(g * c)^T x``
    without dropout, ``g^T x + ((c - 1) * g)^T x'`` with it. W is frozen in DoRA training and
    serving; this is for a caller that trains it anyway."""
    scale = magnitude.to(norm.dtype) / norm
    wide = grad_y.to(norm.dtype)
    if not keep.numel():
        return ((wide * scale).t() @ x.to(norm.dtype)).to(weight.dtype)
    dropped = _dropped(x.to(norm.dtype), keep, dropout_p)
    return (wide.t() @ x.to(norm.dtype) + (wide * (scale - 1.0)).t() @ dropped).to(weight.dtype)
