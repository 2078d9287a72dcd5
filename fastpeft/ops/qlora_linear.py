"""The LoRA linear op on a quantized base weight (QLoRA), registered with torch.library
(autograd, fake tensors):

    y = (x_c W_c^T + b_c) -> x.dtype  +  scaling * dropout(x) A^T B^T,   W_c = dequant(W) in the compute dtype

``torch.ops.fastpeft.qlora_linear`` takes the quantized weight itself -- bitsandbytes' packed
4-bit codes (NF4 / FP4) with their block scales (double quantization included), its int8 rows
with their scales, or torchao's int8 weight-only rows with theirs (``QuantizedWeight``; the
layouts: ``fastpeft.kernels.quant.ref``) -- never a
dequantized copy kept between calls. What the op saves for the backward is x, the packed weight
(the model's own tensors), ``s = x_hat A^T`` ``[M, r]`` and the dropout mask (as the LoRA op:
``fastpeft.ops.dropout``): one layer's dequantized weight is alive at a time, in the forward or
the backward, never between them.

Paths:

- torch (the CPU, and CUDA unless the kernels are in use): the weight dequantized into a
  transient ``[N, K]`` tensor in the compute dtype (bitsandbytes' ``compute_dtype``; for
  bitsandbytes' 4-bit weights its own kernels -- on CUDA always, on the CPU where they give the
  reference's bits: ``fastpeft.kernels.quant.bitsandbytes_ops`` --, else torch ops), x cast to it for
  ``F.linear`` as bitsandbytes' layer does, the output cast back to x's dtype, the LoRA term
  PEFT's (computed from x in the adapter's dtype, added in the output's). The backward
  dequantizes again: dX's base term is ``dY W`` in the compute dtype (bitsandbytes' own
  backward), its LoRA term the LoRA op's.
- kernels (``FASTPEFT_BACKEND=triton``, x in the compute dtype, not torchao's NF4; opt-in: no GPU
  has run them): up to 16 rows (decode; ``fastpeft.kernels.quant.launch.decode_fits``: rank <= 64,
  on a GPU N and K multiples of 16 and a 16-bit compute dtype) the fused decode kernel reads the
  packed weight once, dequantizing in registers, and adds the LoRA term
  (``fastpeft.kernels.quant.decode_kernel``); above, one Triton
  launch dequantizes (double quantization included) and the float LoRA op's forward runs on that
  transient weight (its dispatch: the fused GEMM, the cuBLAS-hybrid path or torch's). The
  backward dequantizes in one launch and runs the float op's backward (its fused dX kernel).

The base part is the dequantization of ``fastpeft.kernels.quant.ref`` then the product in the
compute dtype: on the CPU bit for bit bitsandbytes' own layer's training-mode output (on CUDA its
int8 layers multiply int8 activations, and its 4-bit ones may use their own GEMV kernels: not
compared yet). Gradients: x, A and B (and the bias if it requires grad); the quantized weight is
frozen (no gradient). Double backward (``create_graph=True``) is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpeft.backend import use_triton
from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.kernels.quant import ref
from fastpeft.kernels.quant.bitsandbytes_ops import bitsandbytes_dequantize_4bit, bitsandbytes_dequantizes_exactly
from fastpeft.kernels.quant.ref import INT8_TYPES, NF4_TORCHAO, QUANT_TYPES
from fastpeft.ops.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.ops.checks import describe, require_finite, require_probability, require_same_device, require_tensor
from fastpeft.ops.dropout import kept_mask, redraws_mask, saved_or_redrawn_mask
from fastpeft.ops.lora_linear import lora_backward_by_dispatch, lora_forward_by_dispatch, lora_gradients_fake
from fastpeft.ops.lora_linear_torch import (
    add_lora_product,
    keep_mask,
    lora_backward_torch,
    lora_rank_side,
    rank_side_dtype,
)
from fastpeft.ops.op_calls import call_directly, eager_function, needs_autograd, op_for_call, rows

# Activation and compute dtypes the op takes (bitsandbytes' compute dtypes).
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` base weight (``fastpeft.kernels.quant.ref``):
    ``quant_type`` (``"nf4"``, ``"fp4"``, ``"int8"``, ``"int8-scaled"`` or ``"nf4-torchao"``),
    ``packed`` (4-bit: the packed codes in any storage dtype; int8: CB ``[N, K]``), ``absmax``
    (4-bit: per-block scales, fp32, or uint8 codes with double quantization, torchao's int8 ones;
    int8: SCB ``[N]``, or the row scales), ``code`` (4-bit: the 16-value table), the double
    quantization's ``nested_absmax``, ``nested_code``, ``offset`` and ``nested_blocksize``
    (None / 0 without it), ``blocksize``, and ``compute_dtype`` (the dtype the base product runs
    in; None: the activations')."""

    quant_type: str
    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor | None
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    nested_blocksize: int
    out_features: int
    in_features: int
    compute_dtype: torch.dtype | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The op's tensor arguments: packed, absmax, code, nested_absmax, nested_code, offset."""
        return self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W ``[out_features, in_features]`` in ``dtype`` (``ref.dequantize``: bit for bit the
        quantizer's own dequantization)."""
        return ref.dequantize(self.quant_type, *self.tensors(), self.blocksize, self.nested_blocksize, self.shape,
                              dtype)


def check_quantized_weight(weight: object) -> QuantizedWeight:
    """``weight`` must be a consistent ``QuantizedWeight``; ValueError / TypeError naming what is wrong."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a fastpeft.ops.QuantizedWeight, got {type(weight).__name__}")
    w = weight
    if w.quant_type not in QUANT_TYPES:
        raise ValueError(f"weight.quant_type must be one of {QUANT_TYPES}, got {w.quant_type!r}")
    n, k = w.shape
    if n < 1 or k < 1:
        raise ValueError(f"weight shape must be positive, got [{n}, {k}]")
    if w.quant_type in INT8_TYPES:
        if w.packed.dtype != torch.int8 or tuple(w.packed.shape) != (n, k):
            raise ValueError(f"int8 weight.packed ({describe(w.packed)}) must be int8 of shape ({n}, {k})")
        if w.absmax.dtype != torch.float32 or tuple(w.absmax.shape) != (n,):
            raise ValueError(f"int8 weight.absmax ({describe(w.absmax)}) must be float32 of shape ({n},)")
        return w
    if w.packed.numel() * w.packed.element_size() * 2 != n * k:
        raise ValueError(f"4-bit weight.packed ({describe(w.packed)}) must hold {n} x {k} / 2 bytes")
    if w.quant_type == NF4_TORCHAO:
        return _check_nf4_torchao(w, n * k)
    if w.blocksize < 1 or w.absmax.numel() != math.ceil(n * k / w.blocksize):
        raise ValueError(f"weight.absmax ({describe(w.absmax)}) must hold one scale per block of {w.blocksize} "
                         f"elements ({math.ceil(n * k / w.blocksize)})")
    if w.code is None or w.code.dtype != torch.float32 or w.code.numel() != 16:
        raise ValueError("4-bit weight.code must be the 16-value float32 code table")
    nested = (w.nested_absmax, w.nested_code, w.offset)
    if any(t is None for t in nested) != all(t is None for t in nested):
        raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
    if w.nested_absmax is not None:
        if w.absmax.dtype != torch.uint8 or w.nested_blocksize < 1:
            raise ValueError(f"double-quantized weight.absmax ({describe(w.absmax)}) must be uint8 codes, with "
                             f"nested_blocksize >= 1 (got {w.nested_blocksize})")
        if w.nested_absmax.numel() != math.ceil(w.absmax.numel() / w.nested_blocksize):
            raise ValueError(f"weight.nested_absmax ({describe(w.nested_absmax)}) must hold one scale per block of "
                             f"{w.nested_blocksize} block scales")
    elif w.absmax.dtype != torch.float32:
        raise ValueError(f"weight.absmax ({describe(w.absmax)}) must be float32 without double quantization")
    return w


def _check_nf4_torchao(w: QuantizedWeight, elements: int) -> QuantizedWeight:
    """torchao's NF4 parts (``ref``): int8 block scales, a float code table, one factor per
    ``nested_blocksize`` blocks and the mean, all but the scales in the weight's dtype."""
    blocks = elements // w.blocksize if w.blocksize >= 1 else -1
    if w.blocksize < 1 or elements % w.blocksize or w.absmax.dtype != torch.int8 or w.absmax.numel() != blocks:
        raise ValueError(f"torchao NF4 weight.absmax ({describe(w.absmax)}) must be int8 with one scale per block of "
                         f"{w.blocksize} elements")
    if w.code is None or not w.code.dtype.is_floating_point or w.code.numel() != 16:
        raise ValueError("torchao NF4 weight.code must be its 16-value table")
    if (w.nested_absmax is None or w.offset is None or w.nested_blocksize < 1 or blocks % w.nested_blocksize
            or w.nested_absmax.numel() != blocks // w.nested_blocksize or w.offset.numel() != 1):
        raise ValueError(f"torchao NF4 weight needs nested_absmax (one factor per {w.nested_blocksize} block scales) "
                         "and offset (the scales' mean)")
    return w


def dequantize(quant_type: str, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None,
               nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
               blocksize: int, nested_blocksize: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``fastpeft.kernels.quant.ref.dequantize``'s result (same arguments): by the Triton kernel
    in one launch where the kernels are in use for the weight's device
    (``fastpeft.backend.use_triton``: opt-in, not yet run on a GPU; torchao's NF4 has no kernel);
    else by bitsandbytes' own kernels where they give the same bits (CUDA; the CPU where its
    kernel is right: ``quant.bitsandbytes_ops``); else in torch ops."""
    args = (packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype)
    if use_triton(packed.device) and quant_type != NF4_TORCHAO:
        from fastpeft.kernels.quant import launch

        return launch.dequantize(quant_type, *args)
    bitsandbytes_4bit = quant_type not in (*INT8_TYPES, NF4_TORCHAO)
    if bitsandbytes_4bit and bitsandbytes_dequantizes_exactly(packed.device, shape[1], blocksize):
        return bitsandbytes_dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                            nested_blocksize, quant_type, shape, dtype)
    return ref.dequantize(quant_type, *args)


def _compute_dtype(weight: QuantizedWeight, x: torch.Tensor) -> torch.dtype:
    return weight.compute_dtype or x.dtype


def _kernels_take(x: torch.Tensor, compute_dtype: torch.dtype, quant_type: str) -> bool:
    """Whether the call runs on the kernels: they are in use for x's device, x is in the
    compute dtype (the base product and the LoRA term then meet in one dtype, as in the float
    op; other calls cast x for the base product and take the torch composition), and the
    weight has kernels (torchao's NF4 has none)."""
    return use_triton(x.device) and x.dtype == compute_dtype and quant_type != NF4_TORCHAO


def _qlora_forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    compute_dtype: torch.dtype,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [..., N] in x's dtype, s [M, r], keep)`` (module docstring); ``keep`` the torch
    path's dropout mask, empty when the backward redraws it or without dropout; ``training``:
    a backward follows (the float op's dispatch then picks the training step's implementation).

    Where the kernels take the call (``_kernels_take``): a decode-sized call
    (``quant.launch.decode_fits``) runs the fused decode kernel on the packed weight; a larger
    one dequantizes in one launch and runs the float LoRA op's forward on that transient weight
    (its dispatch: the fused GEMM, the cuBLAS-hybrid path or torch's)."""
    k = x.shape[-1]
    x2 = rows(x, k)
    quant = (quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize)
    bias_c = bias.to(compute_dtype) if bias is not None else None
    kernels = _kernels_take(x, compute_dtype, quant_type)
    decode = kernels and _decode_fits(x2, out_features, lora_a, lora_b, compute_dtype)
    if kernels and not decode:
        w = dequantize(*quant, (out_features, k), compute_dtype)
        return lora_forward_by_dispatch(x, w, bias_c, lora_a, lora_b, scaling, dropout_p, seed, training)
    keep = keep_mask(x2, dropout_p, seed)
    s = lora_rank_side(x2, lora_a, dropout_p, keep)
    s_scaled = (s * scaling).to(lora_b.dtype)
    if decode:
        from fastpeft.kernels.quant.launch import decode_forward

        y = decode_forward(x2, *quant, bias_c, s_scaled, lora_b)
    else:
        w = dequantize(*quant, (out_features, k), compute_dtype)
        y = add_lora_product(_base_product(x2.to(compute_dtype), w, bias_c, quant_type).to(x.dtype), s_scaled,
                             lora_b.t())
    return y.view(*x.shape[:-1], out_features), s, kept_mask(keep)


def _base_product(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, quant_type: str) -> torch.Tensor:
    """The base layer's ``x W^T + b`` on the dequantized weight, rounded as the base layer's
    own forward rounds it: torchao's NF4 linear adds the bias to the rounded product (a GEMM
    that takes the bias may round differently, by CPU), the others pass it to the GEMM."""
    if quant_type == NF4_TORCHAO and bias is not None:
        return F.linear(x2, w) + bias
    return F.linear(x2, w, bias)


def _decode_fits(x2: torch.Tensor, n: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 compute_dtype: torch.dtype) -> bool:
    from fastpeft.kernels.quant.launch import decode_fits

    return decode_fits(x2.shape[0], n, x2.shape[1], lora_a.shape[0], compute_dtype, lora_b.dtype, x2.device)


_forward_op = torch.library.custom_op("fastpeft::qlora_linear", mutates_args=())(_qlora_forward)


@_forward_op.register_fake
def _qlora_fake(x, packed, absmax, code, nested_absmax, nested_code, offset, bias, lora_a, lora_b, quant_type,
                blocksize, nested_blocksize, out_features, compute_dtype, scaling, dropout_p, seed, training=False):
    m, k = math.prod(x.shape[:-1]), x.shape[-1]
    keeps = dropout_p > 0.0 and not redraws_mask(x.device)
    return (x.new_empty((*x.shape[:-1], out_features)),
            x.new_empty((m, lora_a.shape[0]), dtype=rank_side_dtype(lora_a.dtype)),
            x.new_empty((m, k) if keeps else (0,), dtype=torch.bool))


def _setup_context(ctx, inputs, output) -> None:
    (x, packed, absmax, code, nested_absmax, nested_code, offset, bias, lora_a, lora_b, quant_type, blocksize,
     nested_blocksize, out_features, compute_dtype, scaling, dropout_p, seed) = inputs[:18]  # then training
    _, s, keep = output
    ctx.mark_non_differentiable(s, keep)
    ctx.save_for_backward(x, packed, absmax, code, nested_absmax, nested_code, offset, lora_a, lora_b, s, keep, seed)
    ctx.quant = (quant_type, blocksize, nested_blocksize, compute_dtype)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _qlora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    keep: torch.Tensor,
    seed: torch.Tensor,
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    compute_dtype: torch.dtype,
    scaling: float,
    dropout_p: float,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX like x, dA [r, K], dB [N, r])``, a gradient not asked for an empty tensor (module
    docstring: the weight dequantized again, for dX only)."""
    quant = (quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize)
    out_features, k = lora_b.shape[0], x.shape[-1]
    w = dequantize(*quant, (out_features, k), compute_dtype) if need_x else None
    if w is not None and _kernels_take(x, compute_dtype, quant_type):  # the float op's backward on the transient weight
        return lora_backward_by_dispatch(grad_y, x, w, lora_a, lora_b, s, keep, scaling, dropout_p, seed, need_x,
                                         need_a, need_b)
    x2, g2 = rows(x, k), rows(grad_y, out_features)
    # dY W in the compute dtype, as bitsandbytes' own backward forms it
    base_grad = (g2.to(compute_dtype) @ w).to(x.dtype) if w is not None else None
    mask = saved_or_redrawn_mask(keep, x2, dropout_p, seed)
    dx, da, db = lora_backward_torch(g2, x2, None, lora_a, lora_b, s, mask, scaling, dropout_p, need_x, need_a,
                                     need_b, base_grad)
    empty = x.new_empty(0)
    dx = dx.view(x.shape) if dx is not None else None
    return tuple(empty if g is None else g for g in (dx, da, db))


_backward_op = torch.library.custom_op("fastpeft::qlora_linear_backward", mutates_args=())(_qlora_backward)


@_backward_op.register_fake
def _qlora_backward_fake(grad_y, x, packed, absmax, code, nested_absmax, nested_code, offset, lora_a, lora_b, s, keep,
                         seed, quant_type, blocksize, nested_blocksize, compute_dtype, scaling, dropout_p, need_x,
                         need_a, need_b):
    return lora_gradients_fake(x, lora_a, lora_b, need_x, need_a, need_b)


def _backward(ctx, grad_y, _grad_s, _grad_keep):
    if torch.is_grad_enabled():
        raise RuntimeError("fastpeft.ops.qlora_linear does not support double backward (create_graph=True)")
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    args = (grad_y, *saved, *ctx.quant, ctx.scaling, ctx.dropout_p, need[0], need[8], need[9])
    op = _qlora_backward if call_directly(grad_y, *saved) else torch.ops.fastpeft.qlora_linear_backward
    dx, da, db = op(*args)
    dbias = rows(grad_y, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype) if need[7] else None
    return (dx if need[0] else None, None, None, None, None, None, None, dbias, da if need[8] else None,
            db if need[9] else None, None, None, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_QLoRAFunction = eager_function("QLoRALinearFunction", _qlora_forward, _setup_context, _backward)


def check_qlora_linear_args(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                            lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout_p: float) -> None:
    """Validate ``qlora_linear``'s arguments (each failure names the argument)."""
    require_tensor("x", x)
    check_quantized_weight(weight)
    n, k = weight.shape
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x ({describe(x)}) must be float32, float16 or bfloat16 on a quantized base")
    if weight.compute_dtype is not None and weight.compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"weight.compute_dtype must be one of {COMPUTE_DTYPES}, got {weight.compute_dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x ({describe(x)}): last dimension must equal the weight's in_features {k}")
    require_tensor("lora_a", lora_a, ndim=2)
    require_tensor("lora_b", lora_b, ndim=2)
    r = lora_a.shape[0]
    if tuple(lora_a.shape) != (r, k) or tuple(lora_b.shape) != (n, r) or r < 1:
        raise ValueError(f"lora_a ({describe(lora_a)}) and lora_b ({describe(lora_b)}) must be [r, {k}] and [{n}, r]")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b dtype {lora_b.dtype} must match lora_a dtype {lora_a.dtype}")
    if bias is not None:
        require_tensor("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias ({describe(bias)}) must have shape ({n},)")
    require_finite("scaling", scaling)
    require_probability("dropout_p", dropout_p)
    require_same_device({"x": x, "weight.packed": weight.packed, "weight.absmax": weight.absmax, "bias": bias,
                         "lora_a": lora_a, "lora_b": lora_b})


def qlora_linear(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """PEFT's LoRA on a bitsandbytes-quantized base layer (module docstring):
    ``base(x) + scaling * dropout(x) A^T B^T``.

    Args:
        x: ``[..., K]`` activations, float32 / float16 / bfloat16.
        weight: the quantized ``[N, K]`` base weight (``QuantizedWeight``).
        bias: ``[N]`` or None (cast to the compute dtype for the base product, as bitsandbytes does).
        lora_a: ``[r, K]``, lora_b: ``[N, r]`` (float32 on a quantized base, PEFT's default).
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)``); dropout_p: on the LoRA branch, in [0, 1);
        training: dropout only when True.

    Under ``torch.autocast`` x, bias, A and B are cast as ``F.linear`` casts its inputs.

    Returns:
        ``[..., N]`` in x's dtype; differentiable in x, A, B (and bias if it requires grad).
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        x, bias, lora_a, lora_b = cast_for_autocast(dtype, x, bias, lora_a, lora_b)
        with autocast_off(device_type):
            return qlora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    check_qlora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else x.new_empty(0, dtype=torch.int64)
    tensors = (x, *weight.tensors(), bias, lora_a, lora_b)
    op = op_for_call(_qlora_forward, _QLoRAFunction, torch.ops.fastpeft.qlora_linear, *tensors)
    y, _, _ = op(*tensors, weight.quant_type, weight.blocksize, weight.nested_blocksize, weight.out_features,
                 _compute_dtype(weight, x), float(scaling), p, seed, needs_autograd(*tensors))
    return y
