"""The bottleneck adapter's float64 reference activations and the magnitude bounds of its
outputs and gradients: what the tests and ``fastpeft tune``'s validation compare the op with
(``fastpeft.tune.numerics.element_violations``).

The activations are written from the formulas of transformers' ACT2FN (through which AdapterHub
resolves its names): they share no code with the torch path's table and name map
(``fastpeft.kernels.bottleneck.ref``), and tests/ops/test_bottleneck_adapter.py pins both
against ACT2FN.
"""

from __future__ import annotations

import math

import torch


def _gelu_erf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def _silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 + torch.exp(-z))


def _relu(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z > 0, z, torch.zeros_like(z))  # derivative 0 at 0, as torch's ReLU


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


# The float64 reference's activations, by every name the op accepts (module docstring).
REFERENCE_ACTIVATIONS = {
    "relu": _relu,
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "silu": _silu,
    "swish": _silu,
    "linear": _identity,
    "identity": _identity,
}
# max |act'| and max |act''| of each formula above (the GELUs: 1.129 and 2 phi(0) = 0.798;
# SiLU: 1.0998 and 0.5), for ``bottleneck_magnitudes``.
_DERIVATIVE_BOUNDS = {_relu: (1.0, 0.0), _identity: (1.0, 0.0), _gelu_erf: (1.13, 0.8), _gelu_tanh: (1.13, 0.8),
                      _silu: (1.1, 0.5)}


def bottleneck_magnitudes(h, w_down, b_down, w_up, b_up, residual, activation, scaling, keep, dropout_p, grad_out):
    """Magnitude bounds (``fastpeft.tune.numerics.element_violations``) of the bottleneck
    adapter's "out" and "z" and of the gradients of "h", "w_down", "b_down", "w_up", "b_up",
    "residual" (None where the input is None) and "scaling", by those names, in float64, for
    ``keep`` (the bool dropout mask, or None).

    The sums of absolute products, as for a multilinear op, with the activation bounded by
    its derivatives (on h's device): z = dropout(h) W_down^T + b_down has magnitude zb = |h'| |W_down|^T +
    |b_down|; a = act(z) carries z's error times up to max|act'| (ab = |a| + max|act'| zb);
    dz = scaling (dout W_up) act'(z) carries it times up to max|act''|."""
    act = REFERENCE_ACTIVATIONS[activation.lower()]
    slope, curvature = _DERIVATIVE_BOUNDS[act]
    device = h.device
    f = [t.detach().to(device, torch.float64) if t is not None else None for t in (h, w_down, b_down, w_up, b_up,
                                                                                   residual)]
    h, w_down, b_down, w_up, b_up, residual = f
    g, s = grad_out.detach().to(device, torch.float64), abs(float(scaling))
    drop = keep.to(device, torch.float64) / (1.0 - dropout_p) if keep is not None else torch.ones_like(h)
    h_in = h.abs() * drop
    z = (h * drop) @ w_down.t() + (b_down if b_down is not None else 0.0)
    zb = h_in @ w_down.abs().t() + (b_down.abs() if b_down is not None else 0.0)
    zr = z.detach().requires_grad_()
    a = act(zr)
    (act_grad,) = torch.autograd.grad(a.sum(), zr)
    ab = a.detach().abs() + slope * zb
    ub = ab @ w_up.abs().t() + (b_up.abs() if b_up is not None else 0.0)
    out_b = (residual if residual is not None else h).abs() + s * ub
    dzb = s * (g.abs() @ w_up.abs()) * (act_grad.abs() + curvature * zb)
    dh_b = (dzb @ w_down.abs()) * drop + (g.abs() if residual is None else 0.0)
    return {
        "out": out_b,
        "z": zb,
        "h": dh_b,
        "w_down": dzb.reshape(-1, dzb.shape[-1]).t() @ h_in.reshape(-1, h.shape[-1]),
        "b_down": dzb.reshape(-1, dzb.shape[-1]).sum(0) if b_down is not None else None,
        "w_up": s * g.abs().reshape(-1, g.shape[-1]).t() @ ab.reshape(-1, ab.shape[-1]),
        "b_up": s * g.abs().reshape(-1, g.shape[-1]).sum(0) if b_up is not None else None,
        "residual": g.abs() if residual is not None else None,
        "scaling": (g.abs() * ub).sum(),
    }
