"""A bottleneck adapter op problem (h, W_down, b_down, W_up, b_up and a separate residual,
drawn fresh on the test device) and the check of the op's forward and every gradient
against float64 math, shared by the bottleneck op's test files. The reference's activations
and the magnitude bounds are ``fastpeft.tune.bottleneck_bounds``'s (``fastpeft tune`` checks a
user's GPU with them)."""

from __future__ import annotations

import dataclasses
import math

import torch

from fastpeft.ops import bottleneck_adapter, bottleneck_adapter_dropout_mask, bottleneck_adapter_ref
from fastpeft.tune.bottleneck_bounds import REFERENCE_ACTIVATIONS, bottleneck_magnitudes
from tests.helpers.devices import DEVICE
from tests.helpers.dropout_replay import replayed_keep_mask
from tests.helpers.numerics import TOLERANCE, assert_close, assert_within_bound

__all__ = ["REFERENCE_ACTIVATIONS", "Problem", "bottleneck_magnitudes", "check_against_reference", "leaf",
           "make_problem"]


@dataclasses.dataclass
class Problem:
    """The inputs of one bottleneck adapter call (``None``: no bias / no separate residual)."""

    h: torch.Tensor
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    w_up: torch.Tensor
    b_up: torch.Tensor | None
    residual: torch.Tensor | None = None


def make_problem(lead: tuple[int, ...], d: int, r: int, dtype: torch.dtype, w_dtype: torch.dtype | None = None,
                 biases: bool = True, residual: bool = False) -> Problem:
    """Fresh random inputs, scaled so that the adapter's term is as large as h (an error in
    it cannot hide behind the residual)."""
    w_dtype = w_dtype or dtype

    def randn(*shape: int, scale: float = 1.0, dt: torch.dtype = w_dtype) -> torch.Tensor:
        return (torch.randn(*shape, device=DEVICE) * scale).to(dt)

    return Problem(
        h=randn(*lead, d, dt=dtype),
        w_down=randn(r, d, scale=1 / math.sqrt(d)),
        b_down=randn(r, scale=0.5) if biases else None,
        w_up=randn(d, r, scale=1 / math.sqrt(r)),
        b_up=randn(d, scale=0.5) if biases else None,
        residual=randn(*lead, d, dt=dtype) if residual else None,
    )


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached copy of ``t`` that requires grad (``None`` stays ``None``)."""
    return t.detach().requires_grad_() if t is not None else None


def check_against_reference(pb: Problem, activation: str = "gelu", dropout_p: float = 0.0, learned: bool = True,
                            grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the op (forward + backward) and compare out and every gradient with float64 math,
    rebuilding the dropout from the op's own seed so both use the same mask. Returns out."""
    names = ("h", "w_down", "b_down", "w_up", "b_up", "residual")
    leaves = {k: leaf(getattr(pb, k)) for k in names}
    # A learned scaling is fp32 (AdapterHub's parameter), float64 beside a float64 adapter.
    s_dtype = torch.float64 if pb.h.dtype == torch.float64 else torch.float32
    scaling = torch.tensor(0.75, dtype=s_dtype, device=DEVICE, requires_grad=True) if learned else 0.75
    torch.manual_seed(1234)
    out = bottleneck_adapter(leaves["h"], leaves["w_down"], leaves["b_down"], leaves["w_up"], leaves["b_up"],
                             activation, scaling, leaves["residual"], dropout_p, training=dropout_p > 0)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)

    h = pb.h
    mask = None
    if dropout_p > 0:
        torch.manual_seed(1234)
        seed = torch.randint(0, 2**62, (1,), device=DEVICE, dtype=torch.int64)  # what the op drew
        mask = replayed_keep_mask(seed, h.numel() // h.shape[-1], h.shape[-1], dropout_p,
                                  bottleneck_adapter_dropout_mask).reshape(h.shape)
    ref = {k: (getattr(pb, k).detach().double().requires_grad_() if getattr(pb, k) is not None else None)
           for k in names}
    scaling64 = torch.tensor(0.75, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out64 = bottleneck_adapter_ref(ref["h"], ref["w_down"], ref["b_down"], ref["w_up"], ref["b_up"],
                                   REFERENCE_ACTIVATIONS[activation.lower()], scaling64, ref["residual"], dropout_p,
                                   dropout_mask=mask)
    out64.backward(grad_out.double())

    dtype = h.dtype
    assert out.dtype == dtype and out.shape == h.shape
    bounds = bottleneck_magnitudes(pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, pb.residual, activation, 0.75, mask,
                                   dropout_p, grad_out)
    assert_close(out, out64, dtype, "out")
    assert_within_bound(out, out64, bounds["out"], dtype, "out")
    for k in names:
        if leaves[k] is None:
            continue
        assert leaves[k].grad.dtype == leaves[k].dtype, k
        assert_close(leaves[k].grad, ref[k].grad, dtype, f"d{k}")
        assert_within_bound(leaves[k].grad, ref[k].grad, bounds[k], dtype, f"d{k}")
    if learned:
        assert scaling.grad.shape == () and scaling.grad.dtype == s_dtype
        # dscaling = sum(grad_out * u) is one dot product whose terms cancel: its rounding error
        # is bounded relative to sum |grad_out * u| (the sum's condition), not to its value.
        base64 = ref["residual"] if ref["residual"] is not None else ref["h"]
        u64 = (out64 - base64).detach() / 0.75
        scale = (grad_out.double() * u64).abs().sum().item()
        err = abs(scaling.grad.item() - scaling64.grad.item()) / scale
        assert err <= TOLERANCE[dtype], f"dscaling: error {err:.3e} of sum|g u| > {TOLERANCE[dtype]:.1e} ({dtype})"
    return out
