"""The fused LoRA linear op, registered with torch.library (autograd, fake tensors).

    y = x W^T + b + scaling * dropout(x) A^T B^T

``torch.ops.fastpeft.lora_linear`` holds the forward (returning ``y``, ``s = x_hat A^T`` and
the torch path's dropout mask, the only activations it saves besides its inputs) and
``torch.ops.fastpeft.lora_linear_backward`` the backward; each dispatches, per call, to the
fused Triton kernels, the cuBLAS-hybrid path or the torch path
(``fastpeft.kernels.lora.dispatch.choose_implementation``; ``fastpeft.backend``). Dropout
draws from a 64-bit seed tensor made on x's device from torch's generator (no host sync,
CUDA-graph safe); the kernel paths regenerate the mask from it in the backward, the torch
path keeps it (one byte per element) unless the kernels' mask kernel can redraw it
(``fastpeft.ops.dropout``).
"""

from __future__ import annotations

import math

import torch

from fastpeft.backend import use_triton
from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.ops.checks import check_lora_linear_args
from fastpeft.ops.dropout import kept_mask, rebuilt_keep_mask, redraws_mask, saved_or_redrawn_mask
from fastpeft.ops.lora_linear_torch import (
    base_linear_grads,
    lora_backward_torch,
    lora_forward_torch,
    lora_rank_side,
    rank_side_dtype,
)
from fastpeft.ops.op_calls import call_directly, eager_function, needs_autograd, op_for_call, rows


def _implementation(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, training: bool,
                    dropout_p: float) -> str:
    """``"fused"``, ``"fused-tma"``, ``"hybrid"`` or ``"torch"`` for an inference forward, or (``training``) for
    either pass of a training step with dropout ``dropout_p``: ``fastpeft.kernels.lora.dispatch.choose_implementation``
    (torch-only, no Triton import).
    Imported at the first call, not with the package, so that running the table writer
    (``python -m fastpeft.kernels.lora.dispatch``) does not find it imported already."""
    from fastpeft.kernels.lora import dispatch as lora_dispatch

    return lora_dispatch.choose_implementation(x, weight, lora_a, training, dropout_p > 0.0)


def lora_forward_by_dispatch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [..., N], s [M, R], keep)`` for x ``[..., K]``, M the product of x's leading dims;
    ``training``: a backward follows (the implementation is the training step's, chosen for
    both passes together, not the inference forward's);
    ``s`` in ``rank_side_dtype(lora_a.dtype)`` (fp32 unless the adapter is float64); ``keep``
    the torch path's bool ``[M, K]`` dropout mask, empty on the kernel paths (fused, hybrid),
    without dropout, or where the backward redraws it (``fastpeft.ops.dropout.redraws_mask``)."""
    x2 = rows(x, weight.shape[1])
    impl = _implementation(x, weight, lora_a, training, dropout_p)
    if impl == "torch":
        y, s, keep = lora_forward_torch(x2, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
        keep = kept_mask(keep)
    else:
        if impl == "hybrid":
            from fastpeft.kernels.lora.hybrid_launch import hybrid_forward

            y, s = hybrid_forward(x2, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
        else:  # "fused", or "fused-tma": the same kernels with the sm_90 TMA forward GEMM
            from fastpeft.kernels.lora.launch import lora_forward

            y, s = lora_forward(x2, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, tma=impl == "fused-tma")
        keep = x.new_empty(0, dtype=torch.bool)
    return y.view(*x.shape[:-1], weight.shape[0]), s, keep


_lora_linear_op = torch.library.custom_op("fastpeft::lora_linear", mutates_args=())(lora_forward_by_dispatch)

@_lora_linear_op.register_fake
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, training=False):
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    s = x.new_empty((m, lora_a.shape[0]), dtype=rank_side_dtype(lora_a.dtype))
    saves_mask = (dropout_p > 0.0 and _implementation(x, weight, lora_a, training, dropout_p) == "torch"
                  and not redraws_mask(x.device))
    keep = x.new_empty((m, x.shape[-1]) if saves_mask else (0,), dtype=torch.bool)
    return y, s, keep


def lora_backward_by_dispatch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX like x, dA [R, K], dB [N, R])``; a gradient not asked for is an empty tensor.
    The kernel paths regenerate the dropout mask from ``seed``; the torch path uses ``keep``,
    or, when the forward kept none (a kernel path ran it, or the mask is redrawn), redraws the
    kernels' Philox mask (``fastpeft.ops.dropout.saved_or_redrawn_mask``)."""
    g2, x2 = rows(grad_y, weight.shape[0]), rows(x, weight.shape[1])
    needs = (need_x, need_a, need_b)
    # A kept mask: the torch path ran the forward with a mask not drawn from the seed (torch's
    # CUDA generator), which only the torch backward reads.
    impl = "torch" if keep.numel() else _implementation(x, weight, lora_a, True, dropout_p)
    if impl == "torch":
        keep = saved_or_redrawn_mask(keep, x2, dropout_p, seed)
        dx, da, db = lora_backward_torch(g2, x2, weight, lora_a, lora_b, s, keep, scaling, dropout_p, *needs)
    else:
        if impl == "hybrid":
            from fastpeft.kernels.lora.hybrid_launch import hybrid_backward as lora_backward
        else:  # "fused" and "fused-tma" (whose TMA kernel is a forward GEMM) share the backward
            from fastpeft.kernels.lora.launch import lora_backward
        dx, da, db = lora_backward(g2, x2, weight, lora_a, lora_b, s, scaling, dropout_p, seed, *needs)
    return (
        dx.view(x.shape) if dx is not None else x.new_empty(0),
        da if da is not None else x.new_empty(0),
        db if db is not None else x.new_empty(0),
    )


_lora_linear_backward_op = torch.library.custom_op("fastpeft::lora_linear_backward", mutates_args=())(
    lora_backward_by_dispatch
)


def lora_gradients_fake(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, need_x: bool, need_a: bool,
                        need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fake ``(dX, dA, dB)`` of a LoRA backward op (this one's and the QLoRA op's): each
    like its input, or an empty tensor when not asked for."""
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty(0),
        lora_a.new_empty(lora_a.shape) if need_a else x.new_empty(0),
        lora_b.new_empty(lora_b.shape) if need_b else x.new_empty(0),
    )


@_lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, s, keep, scaling, dropout_p, seed, need_x, need_a,
                               need_b):
    return lora_gradients_fake(x, lora_a, lora_b, need_x, need_a, need_b)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs[:8]  # then training
    _, s, keep = output
    ctx.mark_non_differentiable(s, keep)
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, keep, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p


def _differentiable_backward(grad_y, x, weight, lora_a, lora_b, keep, scaling, dropout_p, seed, need_x, need_a,
                             need_b):
    """The backward as plain torch ops that autograd records, for ``create_graph=True``
    (double backward, e.g. gradient penalties): ``s`` is recomputed with autograd instead
    of read from the non-differentiable saved copy. The dropout mask is the torch path's
    saved one, or the kernels' Philox mask redrawn from the seed
    (``fastpeft.ops.dropout.saved_or_redrawn_mask``)."""
    x2, g2 = rows(x, weight.shape[1]), rows(grad_y, weight.shape[0])
    keep = saved_or_redrawn_mask(keep, x2, dropout_p, seed)
    s = lora_rank_side(x2, lora_a, dropout_p, keep)
    dx, da, db = lora_backward_torch(g2, x2, weight, lora_a, lora_b, s, keep, scaling, dropout_p, need_x, need_a, need_b)
    return dx.view(x.shape) if dx is not None else None, da, db


def _backward(ctx, grad_y, _grad_s, _grad_keep):
    x, weight, lora_a, lora_b, s, keep, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    args = (ctx.scaling, ctx.dropout_p, seed, need_x, need_a, need_b)
    if torch.is_grad_enabled():
        dx, da, db = _differentiable_backward(grad_y, x, weight, lora_a, lora_b, keep, *args)
    else:
        direct = call_directly(grad_y, x, weight, lora_a, lora_b, s, keep, seed)
        op = lora_backward_by_dispatch if direct else torch.ops.fastpeft.lora_linear_backward
        dx, da, db = op(grad_y, x, weight, lora_a, lora_b, s, keep, *args)
    dw, dbias = base_linear_grads(grad_y, x, weight, need_w, need_bias)
    return (
        dx if need_x else None,
        dw,
        dbias,
        da if need_a else None,
        db if need_b else None,
        None,
        None,
        None,
        None,
    )


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# Eager training calls on plain tensors apply the registered forward/backward through this
# Function instead of the custom op's dispatch (``op_calls``).
_LoRALinearFunction = eager_function("LoRALinearFunction", lora_forward_by_dispatch, _setup_context, _backward)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """PEFT's LoRA linear, fused: ``F.linear(x, W, b) + scaling * F.linear(F.linear(dropout(x), A), B)``.

    Args:
        x: ``[..., K]`` activations, float32 / float16 / bfloat16, any strides.
        weight: ``[N, K]`` frozen base weight, x's dtype.
        bias: ``[N]`` in x's dtype, or None.
        lora_a: ``[r, K]`` LoRA A (may be float32 while x is 16-bit, PEFT's default).
        lora_b: ``[N, r]`` LoRA B, lora_a's dtype.
        scaling: multiplier of the LoRA term (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        training: dropout is applied only when True.

    Under ``torch.autocast`` for x's device, the op follows ``F.linear``'s rules, as PEFT's
    layer does: every input but float64 ones is cast to the autocast dtype (LoRA weights
    included), the output is in that dtype, and gradients come back in each input's dtype.

    Returns:
        ``[..., N]`` in x's dtype (fp32 accumulation). Differentiable in x, lora_a and lora_b
        (and weight/bias if they require grad). Saves ``x``, the weights, an ``M x r`` fp32
        tensor and the seed for backward; the kernels regenerate the dropout mask, the torch
        path keeps it as one byte per element of x (PEFT keeps a dropped-out copy of x).
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        x, weight, bias, lora_a, lora_b = cast_for_autocast(dtype, x, weight, bias, lora_a, lora_b)
        with autocast_off(device_type):
            return lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else x.new_empty(0, dtype=torch.int64)
    tensors = (x, weight, bias, lora_a, lora_b)
    op = op_for_call(lora_forward_by_dispatch, _LoRALinearFunction, torch.ops.fastpeft.lora_linear, *tensors)
    y, _, _ = op(*tensors, float(scaling), p, seed, needs_autograd(*tensors))
    return y


def lora_linear_dropout_mask(seed: torch.Tensor, m: int, k: int, dropout_p: float,
                             keep: torch.Tensor | None = None) -> torch.Tensor:
    """The bool keep-mask ``[m, k]`` the op draws for ``seed`` (a 1-element int64 tensor) on
    the backend in use for ``seed.device``; with ``keep`` (the ``keep`` output of
    ``torch.ops.fastpeft.lora_linear``'s call), the mask that call drew whichever
    implementation ran it -- under ``auto`` on a GPU with a tuned table, only ``keep`` tells
    (``fastpeft.ops.dropout.rebuilt_keep_mask``). Tests use it to rebuild a forward's dropout.

    Raises:
        ValueError: without ``keep``, on CUDA without the kernels, where the op's torch path
            draws its mask from torch's CUDA generator (``fastpeft.ops.dropout``).
    """
    return rebuilt_keep_mask(seed, m, k, dropout_p, use_triton(seed.device), keep)
