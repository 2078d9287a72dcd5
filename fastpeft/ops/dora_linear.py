"""The DoRA linear op (weight-decomposed LoRA, PEFT's ``use_dora=True``), registered with
torch.library (autograd, fake tensors):

    y = x W^T + b + (c - 1) * (x' W^T) + c * scaling * (x' A^T B^T),   c = m / ||W + scaling B A||_row

with ``x' = dropout(x)`` and the row norm detached (``fastpeft.ops.dora_linear_torch`` has the
math). ``torch.ops.fastpeft.dora_linear`` holds the forward (returning ``y`` and what the
backward reads: ``u``, ``s``, the dropout mask and the row norms) and
``torch.ops.fastpeft.dora_linear_backward`` the backward, gradients to x, A, B and m (and to
W and b if they require it).

Implementations: the torch path (``fastpeft.ops.dora_linear_torch``) by default, on every
device; with ``FASTPEFT_BACKEND=triton`` (opt-in: no GPU has run them) and no dropout, where
the LoRA kernels take the shapes, the LoRA kernels with DoRA's epilogue: the forward kernel
multiplies its accumulator ``x W^T + s x A^T B^T`` by ``c`` per column before the bias and
also writes the unscaled ``u``; the backward runs the LoRA backward kernels on ``g * c`` and
forms ``dm`` with torch ops. With dropout the torch path runs (``x W^T`` and ``x' W^T`` from
one read of x is not built).
"""

from __future__ import annotations

import math

import torch

from fastpeft.backend import backend_choice
from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.ops.checks import check_lora_linear_args, describe, require_tensor
from fastpeft.ops.dora_linear_torch import dora_backward_torch, dora_forward_torch, dora_row_norm, dora_weight_grad
from fastpeft.ops.lora_linear import lora_gradients_fake
from fastpeft.ops.lora_linear_torch import base_linear_grads, lora_backward_torch, rank_side_dtype
from fastpeft.ops.op_calls import call_directly, eager_function, op_for_call, rows


def _norm_dtype(weight: torch.Tensor, lora_a: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(weight.dtype, lora_a.dtype), torch.float32)


def _uses_kernels(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, dropout_p: float) -> bool:
    """Whether a call runs the LoRA kernels with DoRA's epilogue: ``FASTPEFT_BACKEND=triton``
    only (unvalidated on a GPU, so never ``auto``), no dropout, and a problem the LoRA kernels
    take (their dispatch picks the fused kernels for it)."""
    if dropout_p > 0.0 or backend_choice() != "triton":
        return False
    from fastpeft.kernels.lora import dispatch

    return dispatch.choose_implementation(x, weight, lora_a, True, False) == dispatch.FUSED


def _dora_forward_kernels(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scale: torch.Tensor, scaling: float,
                          seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, u, s)`` for 2-D x from the LoRA forward kernels with DoRA's epilogue."""
    from fastpeft.kernels import launch_device
    from fastpeft.kernels.lora.launch import lora_forward

    u = launch_device.empty_output((x2.shape[0], weight.shape[0]), x2.dtype, x2.device)
    y, s = lora_forward(x2, weight, bias, lora_a, lora_b, scaling, 0.0, seed,
                        dora_scale=scale.to(torch.float32).contiguous(), u=u)
    return y, u, s


def _lora_backward_kernels(grad_y, x, weight, lora_a, lora_b, s, keep, scaling, dropout_p, need_x, need_a, need_b,
                           base_grad=None):
    """The LoRA backward kernels with ``lora_backward_torch``'s signature, for the calls whose
    forward ran the kernels (no dropout: no mask, no seed, no separate base gradient)."""
    from fastpeft.kernels.lora.launch import lora_backward

    return lora_backward(grad_y, x, weight, lora_a, lora_b, s, scaling, 0.0, x.new_empty(0, dtype=torch.int64),
                         need_x, need_a, need_b)


def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    weight_sq: torch.Tensor | None,
    row_norm: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [..., N], u [M, N], s [M, r], keep, n [N])`` for x ``[..., K]``
    (``dora_forward_torch``, or the kernels: ``_uses_kernels``)."""
    x2 = rows(x, weight.shape[1])
    # an op's output may not alias its input: a given norm is returned as a copy
    norm = dora_row_norm(weight, lora_a, lora_b, scaling, weight_sq) if row_norm is None else row_norm.clone()
    if _uses_kernels(x, weight, lora_a, dropout_p):
        y, u, s = _dora_forward_kernels(x2, weight, bias, lora_a, lora_b, magnitude.to(norm.dtype) / norm, scaling,
                                        seed)
        keep = x.new_empty(0, dtype=torch.bool)
    else:
        y, u, s, keep = dora_forward_torch(x2, weight, bias, lora_a, lora_b, magnitude, norm, scaling, dropout_p, seed)
    return y.view(*x.shape[:-1], weight.shape[0]), u, s, keep, norm


_dora_linear_op = torch.library.custom_op("fastpeft::dora_linear", mutates_args=())(dora_forward)


@_dora_linear_op.register_fake
def _dora_linear_fake(x, weight, bias, lora_a, lora_b, magnitude, weight_sq, row_norm, scaling, dropout_p, seed):
    m, (n, k) = math.prod(x.shape[:-1]), weight.shape
    return (
        x.new_empty((*x.shape[:-1], n)),
        x.new_empty((m, n)),
        x.new_empty((m, lora_a.shape[0]), dtype=rank_side_dtype(lora_a.dtype)),
        x.new_empty((m, k) if dropout_p > 0.0 else (0,), dtype=torch.bool),
        x.new_empty((n,), dtype=_norm_dtype(weight, lora_a) if row_norm is None else row_norm.dtype),
    )


def dora_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX like x, dA, dB, dm)``; a gradient not asked for is an empty tensor
    (``dora_backward_torch``, or, where the forward ran them, the LoRA backward kernels on
    ``g * c``: ``_uses_kernels``)."""
    n, k = weight.shape
    lora_gradients = _lora_backward_kernels if _uses_kernels(x, weight, lora_a, dropout_p) else lora_backward_torch
    dx, da, db, dm = dora_backward_torch(rows(grad_y, n), rows(x, k), weight, lora_a, lora_b, magnitude, u, s, keep,
                                         norm, scaling, dropout_p, need_x, need_a, need_b, need_m, lora_gradients)
    # a separate empty tensor per gradient not asked for: an op's outputs may not alias each other
    return (dx.view(x.shape) if dx is not None else x.new_empty(0), da if da is not None else x.new_empty(0),
            db if db is not None else x.new_empty(0), dm if dm is not None else x.new_empty(0))


_dora_linear_backward_op = torch.library.custom_op("fastpeft::dora_linear_backward", mutates_args=())(dora_backward)


@_dora_linear_backward_op.register_fake
def _dora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, magnitude, u, s, keep, norm, scaling, dropout_p,
                               need_x, need_a, need_b, need_m):
    dx, da, db = lora_gradients_fake(x, lora_a, lora_b, need_x, need_a, need_b)
    return dx, da, db, magnitude.new_empty(magnitude.shape) if need_m else x.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, lora_a, lora_b, magnitude, _, _, scaling, dropout_p, _ = inputs
    _, u, s, keep, norm = output
    ctx.mark_non_differentiable(u, s, keep, norm)
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, u, s, keep, norm)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _backward(ctx, grad_y, _grad_u, _grad_s, _grad_keep, _grad_norm):
    if torch.is_grad_enabled():
        raise NotImplementedError("fastpeft.ops.dora_linear has no double backward (create_graph=True)")
    x, weight, lora_a, lora_b, magnitude, u, s, keep, norm = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
    tensors = (grad_y, x, weight, lora_a, lora_b, magnitude, u, s, keep, norm)
    op = dora_backward if call_directly(*tensors) else torch.ops.fastpeft.dora_linear_backward
    dx, da, db, dm = op(*tensors, ctx.scaling, ctx.dropout_p, need_x, need_a, need_b, need_m)
    dw = dora_weight_grad(rows(grad_y, weight.shape[0]), rows(x, weight.shape[1]), weight, magnitude, norm, keep,
                          ctx.dropout_p) if need_w else None
    _, dbias = base_linear_grads(grad_y, x, weight, False, need_bias)
    return (dx if need_x else None, dw, dbias, da if need_a else None, db if need_b else None,
            dm if need_m else None, None, None, None, None, None)


_dora_linear_op.register_autograd(_backward, setup_context=_setup_context)
_DoRALinearFunction = eager_function("DoRALinearFunction", dora_forward, _setup_context, _backward)


def check_dora_args(weight: torch.Tensor, magnitude: torch.Tensor, weight_sq: torch.Tensor | None,
                    row_norm: torch.Tensor | None) -> None:
    """The DoRA-only arguments: ``magnitude [N]`` (and the optional ``weight_sq`` / ``row_norm``
    ``[N]``) floating, on W's device."""
    n = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("weight_sq", weight_sq), ("row_norm", row_norm)):
        if t is None and name != "magnitude":
            continue
        require_tensor(name, t, ndim=1)
        if t.shape[0] != n or t.device != weight.device:
            raise ValueError(f"{name} ({describe(t)}) must have shape ({n},), one entry per output feature of "
                             f"weight {tuple(weight.shape)}, on {weight.device}")


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_sq: torch.Tensor | None = None,
    row_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """PEFT's DoRA linear (``lora.Linear`` with ``use_dora=True``), as one op.

    Args:
        x: ``[..., K]`` activations, float32 / float16 / bfloat16 / float64, any strides.
        weight: ``[N, K]`` frozen base weight, x's dtype.
        bias: ``[N]`` in x's dtype, or None.
        lora_a, lora_b: ``[r, K]``, ``[N, r]`` LoRA weights (may be float32 on a 16-bit x).
        magnitude: ``[N]`` DoRA magnitude ``m`` (PEFT's ``lora_magnitude_vector``).
        scaling: LoRA scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
        dropout_p: dropout on the adapter's input, applied only when ``training``.
        weight_sq: optional ``[N]`` squared row norms of ``weight`` (cache them: W is frozen).
        row_norm: optional ``[N]`` ``||W + scaling B A||_row`` of these very weights, cached by
            the caller while none of them changes (inference); computed when None.

    Under ``torch.autocast`` x, W, b, A and B are cast as ``F.linear`` casts them (as PEFT's
    layer gets them); ``m`` and the scale stay float32.

    Returns:
        ``[..., N]`` in x's dtype; differentiable in x, A, B and m (and W, b if they require
        grad). Saves x, the weights, ``u`` (``[M, N]``), ``s`` (``[M, r]``), the dropout mask (one
        byte per element of x) and the row norms.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        x, weight, bias, lora_a, lora_b = cast_for_autocast(dtype, x, weight, bias, lora_a, lora_b)
        with autocast_off(device_type):
            return dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, training, weight_sq,
                               row_norm)
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    check_dora_args(weight, magnitude, weight_sq, row_norm)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else x.new_empty(0, dtype=torch.int64)
    tensors = (x, weight, bias, lora_a, lora_b, magnitude, weight_sq, row_norm)
    op = op_for_call(dora_forward, _DoRALinearFunction, torch.ops.fastpeft.dora_linear, *tensors)
    y, *_ = op(*tensors, float(scaling), p, seed)
    return y
