"""The torch composite path of the LoRA linear op: CPU tensors, float64, ranks above the
Triton kernels' limit, and ``FASTPEFT_BACKEND=torch``.

Same contract as the Triton path, except for dropout: the torch path draws its mask with
``fastpeft.ops.dropout.keep_mask_torch_path`` and keeps it (bool, one byte per element of x)
for the backward, where regenerating it would cost a second draw (on the CPU, torch's
generator is the slowest part of a LoRA step), except where the kernels' mask kernel redraws
it (``fastpeft.ops.dropout.redraws_mask``). The rank-r side runs in the LoRA weights' dtype through the
B product, as in PEFT (fp32 adapters on a 16-bit model keep an fp32 branch: ``s * scaling``
is never rounded to 16 bits, so a large intermediate cannot overflow). When the LoRA weights share the activations' dtype the LoRA
product accumulates into the base result with one ``addmm_``; with wider LoRA weights the
``M x N`` delta is formed in their dtype and added with a single rounding, as PEFT does.

Every function here is plain torch ops, so autograd can differentiate them: the op's
double backward runs ``lora_backward_torch`` on a recomputed ``s`` (``lora_rank_side``).
"""

from __future__ import annotations

import torch

from fastpeft.ops.dropout import keep_mask_torch_path
from fastpeft.ops.op_calls import rows


def rank_side_dtype(lora_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved rank-r activations ``s``: fp32, or float64 for float64 adapters."""
    return torch.promote_types(lora_dtype, torch.float32)


def keep_mask(x: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """The bool keep-mask ``[M, K]`` the torch path draws for 2-D x (``keep_mask_torch_path``);
    empty when p is 0 (``seed`` is then not read and may be None)."""
    if dropout_p == 0.0:
        return x.new_empty(0, dtype=torch.bool)
    return keep_mask_torch_path(seed, x.shape[0], x.shape[1], dropout_p)


def _mask_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The bool keep-mask as a 0/1 factor in ``dtype`` (None when the mask is empty: no dropout).

    The ``1 / (1 - p)`` scale is applied to the rank-r side instead of rounding ``x / (1 - p)``
    in a 16-bit dtype, so multiplying by this factor is exact. It is converted once per pass
    (forward, backward) and used for every product of that pass: on the CPU torch casts a bool
    or uint8 operand of a float multiply to the float dtype in a separate copy anyway (measured:
    a float factor plus ``addcmul_`` makes a one-thread 512x1024->256 forward+backward ~20%
    faster than multiplying by the uint8 view of the mask twice).
    """
    return keep.to(dtype) if keep.numel() else None


def _apply(t: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``t * factor``, or ``t`` without dropout."""
    return t * factor if factor is not None else t


def lora_rank_side(x: torch.Tensor, lora_a: torch.Tensor, dropout_p: float, keep: torch.Tensor) -> torch.Tensor:
    """``s = dropout(x) A^T`` ``[M, R]`` in ``rank_side_dtype`` for 2-D x ``[M, K]`` and its
    keep-mask (the dropout's ``1 / (1 - p)`` included), computed in the LoRA weights' dtype."""
    s = (_apply(x.to(lora_a.dtype), _mask_factor(keep, lora_a.dtype)) @ lora_a.t()).to(rank_side_dtype(lora_a.dtype))
    return s * (1.0 / (1.0 - dropout_p)) if keep.numel() else s


def add_lora_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``out += left @ right`` in place, the product in ``left``'s dtype (the LoRA weights')
    with one rounding to ``out``'s dtype: a single ``addmm_`` when the dtypes agree."""
    if left.dtype == out.dtype:
        return out.addmm_(left, right)
    return out.add_(left @ right)


def lora_forward_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [M, N] in x.dtype, s [M, R] in rank_side_dtype, keep)`` for 2-D x ``[M, K]``;
    ``keep`` is the bool ``[M, K]`` dropout mask (empty without dropout), saved for the
    backward: one byte per element, where PEFT saves the dropped-out copy of x."""
    keep = keep_mask(x, dropout_p, seed)
    s = lora_rank_side(x, lora_a, dropout_p, keep)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return add_lora_product(y, (s * scaling).to(lora_b.dtype), lora_b.t()), s, keep


def lora_backward_torch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_x: bool,
    need_a: bool,
    need_b: bool,
    base_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX [M, K], dA [R, K], dB [N, R])``, each None unless asked for; 2-D grad_y ``[M, N]``
    and the forward's keep-mask (empty without dropout). dX's base term is ``grad_y @ weight``,
    or ``base_grad`` when the caller formed it (a quantized base, in its compute dtype; then
    ``weight`` may be None).

    The rank-r side (``dS``, dA, dB and dX's LoRA term) runs in the LoRA weights' dtype.
    """
    lora_dtype = lora_a.dtype
    g = grad_y.to(lora_dtype)
    db = g.t() @ (s * scaling).to(lora_dtype) if need_b else None
    # dS / (1 - p): the dropout scale rides on the rank-r side.
    ds_scaled = (g @ lora_b) * (scaling / (1.0 - dropout_p))
    factor = _mask_factor(keep, lora_dtype) if need_a or need_x else None
    dx = da = None
    if need_a:
        da = ds_scaled.t() @ _apply(x.to(lora_dtype), factor)
    if need_x:
        dx = grad_y @ weight if base_grad is None else base_grad
        dx = dx.add_(ds_scaled @ lora_a) if factor is None else dx.addcmul_(ds_scaled @ lora_a, factor)
    return dx, da, db


def base_linear_grads(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_w: bool, need_bias: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dW [N, K], dbias [N])`` of the base linear, each None unless asked for, for
    ``grad_y [..., N]`` and ``x [..., K]``, in the weight's dtype. The base weight and bias are
    frozen in LoRA training and serving; when a caller trains them anyway (LoRA and multi-LoRA
    ops alike) their gradients are the plain linear ones."""
    g2 = rows(grad_y, weight.shape[0])
    dw = g2.t().to(weight.dtype) @ rows(x, weight.shape[1]) if need_w else None
    dbias = g2.sum(0).to(weight.dtype) if need_bias else None
    return dw, dbias
