"""Cases of the CUDA C++ bottleneck adapter kernels (csrc/bottleneck.cu) and their check through
the launcher (fastpeft.kernels.bottleneck.cuda_launch) against float64 math, for the CPU
emulation's tests and the GPU's."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.bottleneck import cuda_launch
from fastpeft.kernels.bottleneck.ref import bottleneck_adapter_ref
from fastpeft.kernels.dropout_mask import keep_mask_philox
from tests.helpers.bottleneck_problem import REFERENCE_ACTIVATIONS, bottleneck_magnitudes
from tests.helpers.numerics import assert_close, assert_within_bound

# The backward asked for every gradient (h, w_down, b_down, w_up, b_up, scaling).
ALL_GRADS = (True, True, True, True, True, True)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view with non-unit strides in both dimensions (column stride 2)."""
    big = torch.empty(t.shape[1] * 2 + 3, t.shape[0] * 2, dtype=t.dtype, device=t.device)
    view = big.t()[::2, 3::2]
    view.copy_(t)
    assert view.stride(1) != 1 and view.stride(0) != 1
    return view


def case_inputs(m, d, r, dtype, w_dtype, bias, seed=0, device="cpu"):
    """``(h, w_down, b_down, w_up, b_up, grad_out)`` of an ``m x d`` rank-``r`` problem, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g).to(device, dtype)
    w_down = (torch.randn(r, d, generator=g) / d**0.5).to(device, w_dtype)
    w_up = (torch.randn(d, r, generator=g) / r**0.5).to(device, w_dtype)
    b_down = torch.randn(r, generator=g).to(device, w_dtype) if bias else None
    b_up = torch.randn(d, generator=g).to(device, w_dtype) if bias else None
    grad_out = torch.randn(m, d, generator=g).to(device, dtype)
    return h, w_down, b_down, w_up, b_up, grad_out


def float64_reference(h, w_down, b_down, w_up, b_up, residual, activation, scaling, dropout_p, seed, grad_out):
    """float64 (out, z, grads of h, w_down, b_down, w_up, b_up, scaling) on the same dropout draw."""
    leaves = [t.detach().cpu().double().requires_grad_() if t is not None else None
              for t in (h, w_down, b_down, w_up, b_up)]
    scale = torch.tensor(float(scaling), dtype=torch.float64, requires_grad=True)
    mask = keep_mask_philox(seed, h.shape[0], h.shape[1], dropout_p) if dropout_p > 0 else None
    res = residual.cpu().double() if residual is not None else None
    out = bottleneck_adapter_ref(*leaves, activation=REFERENCE_ACTIVATIONS[activation], scaling=scale, residual=res,
                                 dropout_p=dropout_p, dropout_mask=mask)
    h_hat = leaves[0] * mask / (1 - dropout_p) if mask is not None else leaves[0]
    z = torch.nn.functional.linear(h_hat, leaves[1], leaves[2])
    inputs = [t for t in (*leaves, scale) if t is not None]
    grads = iter(torch.autograd.grad(out, inputs, grad_out.cpu().double()))
    full = [next(grads) if t is not None else None for t in (*leaves, scale)]
    return out.detach(), z.detach(), full


# The launcher cases the emulation and the GPU check, with ``CASE_ARGS`` as their names.
CASES = [
    # m, d, r, activation, bias, separate residual, dropout_p, h dtype, weight dtype, tensor scaling, strided
    pytest.param(7, 50, 8, "relu", True, False, 0.0, torch.float32, torch.float32, False, False, id="fp32-relu"),
    pytest.param(130, 37, 48, "gelu", False, True, 0.0, torch.float32, torch.float32, True, True,
                 id="fp32-gelu-nobias-residual-tensorscale-strided-splits"),
    pytest.param(1, 96, 1, "silu", True, False, 0.3, torch.float32, torch.float32, False, False, id="fp32-decode-r1-dropout"),
    pytest.param(33, 70, 256, "gelu_tanh", True, False, 0.2, torch.float16, torch.float32, False, True,
                 id="fp16-fp32weights-r256-dropout-strided"),
    pytest.param(20, 45, 64, "identity", True, True, 0.0, torch.bfloat16, torch.bfloat16, True, False,
                 id="bf16-identity-residual"),
    pytest.param(17, 40, 16, "relu", True, False, 0.1, torch.float16, torch.float16, False, False, id="fp16-dropout"),
    # Tensor-core forward: 3 blocks of 32 rows (the last 6), D = 264 in 9 steps of 32 and 3 of
    # 128 output columns (the last 8), rank 40 padded to 64, aligned rows: 16-byte loads.
    pytest.param(70, 264, 40, "gelu", True, False, 0.1, torch.bfloat16, torch.bfloat16, False, False,
                 id="bf16-3blocks-D264-r40-dropout"),
]
# The arguments of a ``CASES`` entry: ``check_case``'s after the device.
CASE_ARGS = ("m", "d", "r", "activation", "bias", "separate_residual", "dropout_p", "dtype", "w_dtype",
             "tensor_scaling", "strided")


def check_case(device, m, d, r, activation, bias, separate_residual, dropout_p, dtype, w_dtype, tensor_scaling,
               strided):
    """Forward and backward (every gradient) of cuda_launch on ``device`` against float64;
    returns the outputs, for the GPU tests' determinism check."""
    h, w_down, b_down, w_up, b_up, grad_out = case_inputs(m, d, r, dtype, w_dtype, bias, device=device)
    residual = None
    if separate_residual:
        residual = torch.randn(m, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    if strided:
        h, w_down, grad_out = _strided(h), _strided(w_down), _strided(grad_out)
    scaling_value = 0.75
    scaling = torch.tensor(scaling_value, device=device) if tensor_scaling else scaling_value
    seed = torch.tensor([20261129], dtype=torch.int64, device=device)
    out, z = cuda_launch.bottleneck_forward(h, w_down, b_down, w_up, b_up, residual, activation, scaling, dropout_p, seed)
    grads = cuda_launch.bottleneck_backward(grad_out, h, w_down, w_up, b_up, z, activation, scaling, dropout_p, seed,
                                            residual is None, ALL_GRADS)
    exp_out, exp_z, exp_grads = float64_reference(h, w_down, b_down, w_up, b_up, residual, activation, scaling_value,
                                                  dropout_p, 20261129, grad_out)
    assert out.dtype == dtype and out.is_contiguous() and z.dtype == torch.float32
    mask = keep_mask_philox(20261129, m, d, dropout_p).cpu() if dropout_p > 0 else None
    bounds = bottleneck_magnitudes(h.cpu(), w_down.cpu(), b_down, w_up.cpu(), b_up, residual, activation, scaling_value,
                                   mask, dropout_p, grad_out.cpu())
    z_dtype = torch.float32 if w_dtype == torch.float32 and dtype == torch.float32 else dtype
    for name, got, exp, tol_dtype in (("out", out, exp_out, dtype), ("z", z, exp_z, z_dtype)):
        assert_close(got.cpu(), exp, tol_dtype, name)
        assert_within_bound(got.cpu(), exp, bounds[name], tol_dtype, name)
    names = ("grad_h", "grad_w_down", "grad_b_down", "grad_w_up", "grad_b_up", "grad_scaling")
    for name, got, exp in zip(names, grads, exp_grads):
        if exp is None:  # no bias: the launcher was asked for it anyway and must not fail
            continue
        assert got is not None, name
        want_dtype = dtype if name == "grad_h" else (torch.float32 if name == "grad_scaling" else w_dtype)
        assert got.dtype == want_dtype, (name, got.dtype)
        assert_close(got.cpu().reshape(exp.shape), exp, dtype, name)
        bound = bounds[name.removeprefix("grad_")]
        assert_within_bound(got.cpu().reshape(exp.shape), exp, bound.reshape(exp.shape), dtype, name)
    return (out, z, *grads)
