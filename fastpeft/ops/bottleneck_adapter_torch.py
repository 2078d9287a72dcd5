"""The torch composite path of the bottleneck adapter op: CPU tensors, float64, bottlenecks
above the Triton kernels' limit, and ``FASTPEFT_BACKEND=torch``.

    z = dropout(h) W_down^T + b_down,  out = residual + scaling * (act(z) W_up^T + b_up)

Same contract as the kernels (``fastpeft.kernels.bottleneck.launch``), except for dropout: the
torch path draws its mask with ``fastpeft.ops.dropout.keep_mask_torch_path`` and keeps it
(bool, one byte per element of h) for the backward, as the LoRA op's torch path does. The branch runs in the
adapter weights' dtype (an fp32 adapter on a 16-bit model computes its branch in fp32; the
result is rounded once to h's dtype); ``z`` is saved in ``rank_side_dtype`` (fp32, or float64).

Cost against AdapterHub's module (``nn.Linear``, activation, ``up * scaling``, dropout,
``+ residual``): the biases ride in ``addmm``, the dropout's ``1/(1-p)`` in ``addmm``'s
``alpha``, scale and residual in one ``add``/``addcmul`` (the module makes two more passes over
``[M, D]`` for them); only z (``[M, R]``) and the 1-byte mask are saved, where the module saves
the dropped-out input, the activations and the up-projection. The backward uses aten's fused
activation backward kernels and needs no saved ``[M, D]`` intermediate.

Every function here is plain torch ops, so autograd can differentiate them: the op's double
backward runs ``bottleneck_backward_torch`` on a recomputed z.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpeft.kernels.bottleneck.ref import CANONICAL_ACTIVATIONS
from fastpeft.ops.lora_linear_torch import keep_mask, rank_side_dtype
from fastpeft.ops.op_calls import as_dtype


# Elements of h from which the forward forms ``residual + scaling (a W_up^T + b_up)`` as one
# GEMM over the copies [a, 1] and [W_up, b_up] (one [M, D] pass fewer than F.linear then add).
# Measured 2026-11-29, 2 CPU threads, fp32: up to 1.6M elements the copies' extra calls (and
# MKL's handling of the odd inner size R + 1) made it 1.1-2.4x slower (M = 64, D = 64: 40 vs
# 19 us; M = 2048, D = 768: 4.4 vs 1.9 ms); from 2M (M = 512, D = 4096) on 1.3-2.6x faster.
FUSED_UP_MIN_ELEMENTS = 1 << 21


def down_projection(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, dropout_p: float,
                    keep: torch.Tensor) -> torch.Tensor:
    """``z = dropout(h) W_down^T + b_down`` ``[M, R]`` in ``rank_side_dtype`` for 2-D h and
    its keep-mask (empty: no dropout), the product in the weights' dtype."""
    x = as_dtype(h, w_down.dtype)
    if not keep.numel():
        return as_dtype(F.linear(x, w_down, b_down), rank_side_dtype(w_down.dtype))
    x = x * keep.to(x.dtype)
    alpha = 1.0 / (1.0 - dropout_p)
    z = torch.addmm(b_down, x, w_down.t(), alpha=alpha) if b_down is not None else torch.mm(x, w_down.t()).mul_(alpha)
    return as_dtype(z, rank_side_dtype(w_down.dtype))


def with_ones(a: torch.Tensor, b_up: torch.Tensor | None) -> torch.Tensor:
    """``[a, 1]`` ``[M, R + 1]`` (a column of ones beside a), or a without an up bias: with
    ``with_bias``'s ``[W_up, b_up]``, one GEMM forms ``a W_up^T + b_up``, and one GEMM over dOut
    gives dW_up and db_up together."""
    return torch.cat([a, a.new_ones(a.shape[0], 1)], 1) if b_up is not None else a


def with_bias(w_up: torch.Tensor, b_up: torch.Tensor | None) -> torch.Tensor:
    """``[W_up, b_up]`` ``[D, R + 1]`` (a copy of the weight), or W_up without an up bias."""
    return torch.cat([w_up, b_up[:, None]], 1) if b_up is not None else w_up


def _scaled_add(residual: torch.Tensor, u: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """``residual + scaling * u`` in one pass, in the wider of the two dtypes."""
    if isinstance(scaling, torch.Tensor):
        dtype = torch.promote_types(residual.dtype, u.dtype)
        return torch.addcmul(residual.to(dtype), u, scaling.to(dtype))
    return torch.add(residual, u, alpha=scaling)


def bottleneck_forward_torch(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scaling: float | torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [M, D] in h's dtype, z [M, R], keep)`` for 2-D h ``[M, D]``; ``keep`` is the
    bool ``[M, D]`` dropout mask drawn from ``seed`` (which may be None without dropout;
    ``keep`` is then empty), saved for the backward."""
    keep = keep_mask(h, dropout_p, seed)
    z = down_projection(h, w_down, b_down, dropout_p, keep)
    a = as_dtype(CANONICAL_ACTIVATIONS[activation](z), w_up.dtype)
    base = h if residual is None else residual
    if base.dtype == w_up.dtype and (
        b_up is None or (h.numel() >= FUSED_UP_MIN_ELEMENTS and h.shape[0] > w_up.shape[1] + 1)
    ):
        # One GEMM reads the residual and writes out: residual + (scaling [a, 1]) [W_up, b_up]^T
        # (with b_up: after copying [a, 1] and [W_up, b_up]; see FUSED_UP_MIN_ELEMENTS).
        return torch.addmm(base, with_ones(a, b_up) * scaling, with_bias(w_up, b_up).t()), z, keep
    return as_dtype(_scaled_add(base, F.linear(a, w_up, b_up), scaling), h.dtype), z, keep


def activation_backward(grad: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """``grad * act'(z)``: aten's fused activation backward kernels, which autograd can
    differentiate again (SiLU's has no derivative registered, so its formula is spelled out)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    if activation == "silu":
        sig = torch.sigmoid(z)
        return grad * sig * (1.0 + z * (1.0 - sig))
    return grad


def bottleneck_backward_torch(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    z: torch.Tensor,
    keep: torch.Tensor,
    activation: str,
    scaling: float | torch.Tensor,
    dropout_p: float,
    residual_is_h: bool,
    needs_grad: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """``(grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scaling)`` as in
    ``launch.bottleneck_backward``, for 2-D ``grad_out``/``h`` and the forward's z and keep-mask
    (empty without dropout). The ``[M, R]`` side runs in ``z``'s dtype, the products in the
    weights' dtype."""
    need_h, need_wd, need_bd, need_wu, need_bu, need_s = needs_grad
    w_dtype, r_dtype = w_down.dtype, z.dtype
    g = grad_out.to(w_dtype)
    a = CANONICAL_ACTIVATIONS[activation](z)
    grad_wu = grad_bu = grad_s = None
    if need_wu or need_bu or need_s:
        # g^T [a, 1] = [dW_up, db_up] / scaling in one pass over g; dscaling = sum(g * u) is
        # the sum of that product against [W_up, b_up].
        gw = (g.t() @ with_ones(a.to(w_dtype), b_up)).to(r_dtype)
        grad_s = (gw * with_bias(w_up, b_up)).sum() if need_s else None
        grad_wu = (gw[:, :w_up.shape[1]] * scaling).to(w_dtype) if need_wu else None
        grad_bu = (gw[:, -1] * scaling).to(w_dtype) if need_bu else None
    grad_h = grad_wd = grad_bd = None
    if need_h or need_wd or need_bd:
        dz = activation_backward((g @ w_up).to(r_dtype) * scaling, z, activation)
        grad_bd = dz.sum(0).to(w_dtype) if need_bd else None
        # dz / (1 - p): the dropout scale rides on the [M, R] side.
        dz_hat = (dz * (1.0 / (1.0 - dropout_p)) if keep.numel() else dz).to(w_dtype)
        factor = keep.to(w_dtype) if keep.numel() and (need_h or need_wd) else None
        if need_wd:
            x = h.to(w_dtype)
            grad_wd = dz_hat.t() @ (x * factor if factor is not None else x)
        if need_h:
            grad_h = _input_grad(grad_out, dz_hat, w_down, factor, residual_is_h)
    return grad_h, grad_wd, grad_bd, grad_wu, grad_bu, grad_s


def _input_grad(grad_out: torch.Tensor, dz_hat: torch.Tensor, w_down: torch.Tensor, factor: torch.Tensor | None,
                residual_is_h: bool) -> torch.Tensor:
    """``dh = keep * (dz_hat W_down) [+ grad_out]`` in grad_out's dtype: one GEMM accumulating
    onto grad_out when there is no mask and the dtypes agree."""
    if factor is None and residual_is_h and grad_out.dtype == w_down.dtype:
        return torch.addmm(grad_out, dz_hat, w_down)
    grad_h = dz_hat @ w_down
    if factor is not None:
        grad_h = grad_h * factor
    grad_h = grad_h.to(grad_out.dtype)
    return grad_h + grad_out if residual_is_h else grad_h
