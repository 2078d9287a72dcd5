"""A LoRA op problem (x, W, b, A, B drawn fresh on the test device) and the check of the op's
forward and backward against PEFT's math in float64, shared by the LoRA op's test files."""

from __future__ import annotations

import dataclasses
import math

import torch

from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops import lora_linear_dropout_mask, lora_linear_ref
from fastpeft.ops.dropout import mask_follows_seed
from tests.helpers.devices import DEVICE
from tests.helpers.dropout_replay import independent_keep_mask
from tests.helpers.numerics import assert_close, assert_within_bound, magnitudes

SCALING = 0.75


@dataclasses.dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def make_problem(lead: tuple[int, ...], k: int, n: int, r: int, dtype: torch.dtype,
                 lora_dtype: torch.dtype | None = None, bias: bool = True) -> Problem:
    """Fresh random inputs (B non-zero, unlike PEFT's init, so the LoRA term counts)."""
    lora_dtype = lora_dtype or dtype
    return Problem(
        x=torch.randn(*lead, k, device=DEVICE).to(dtype),
        weight=(torch.randn(n, k, device=DEVICE) / math.sqrt(k)).to(dtype),
        bias=torch.randn(n, device=DEVICE).to(dtype) if bias else None,
        lora_a=(torch.randn(r, k, device=DEVICE) / math.sqrt(k)).to(lora_dtype),
        lora_b=torch.randn(n, r, device=DEVICE).to(lora_dtype),
    )


def check_against_reference(pb: Problem, dropout_p: float, grad_y: torch.Tensor | None = None) -> None:
    """Run the op (forward + backward) and compare y, dx, dA, dB with float64 PEFT math,
    rebuilding the dropout from the op's own seed so both use the same mask."""
    x = pb.x.detach().requires_grad_()
    a = pb.lora_a.detach().requires_grad_()
    b = pb.lora_b.detach().requires_grad_()
    seed = draw_seed(x.device) if dropout_p > 0 else x.new_empty(0, dtype=torch.int64)
    y, _, keep = torch.ops.fastpeft.lora_linear(x, pb.weight, pb.bias, a, b, SCALING, dropout_p, seed)
    if grad_y is None:
        grad_y = torch.randn_like(y)
    y.backward(grad_y)

    k = x.shape[-1]
    mask = None
    if dropout_p > 0 and keep.numel():  # the torch path hands the mask it drew to the backward
        mask = keep.reshape(x.shape)
        if mask_follows_seed(x.device):  # against code the op does not call
            assert torch.equal(mask, independent_keep_mask(seed, x.numel() // k, k, dropout_p).reshape(x.shape))
    elif dropout_p > 0:  # a kernel path ran, or the torch path's mask is redrawn from the seed
        mask = lora_linear_dropout_mask(seed, x.numel() // k, k, dropout_p).reshape(x.shape)
    x64 = pb.x.detach().double().requires_grad_()
    a64 = pb.lora_a.detach().double().requires_grad_()
    b64 = pb.lora_b.detach().double().requires_grad_()
    bias64 = pb.bias.double() if pb.bias is not None else None
    y64 = lora_linear_ref(x64, pb.weight.double(), bias64, a64, b64, SCALING, dropout_p, dropout_mask=mask)
    y64.backward(grad_y.double())

    dtype = pb.x.dtype
    assert y.dtype == dtype
    assert a.grad.dtype == pb.lora_a.dtype and b.grad.dtype == pb.lora_b.dtype
    y_bound, (dx_bound, _, _, da_bound, db_bound) = magnitudes(
        lambda *t: lora_linear_ref(*t, abs(SCALING), dropout_p, dropout_mask=mask),
        [pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b], grad_y)
    for what, got, want, bound in (("y", y, y64, y_bound), ("dx", x.grad, x64.grad, dx_bound),
                                   ("dA", a.grad, a64.grad, da_bound), ("dB", b.grad, b64.grad, db_bound)):
        assert_close(got, want, dtype, what)
        assert_within_bound(got, want, bound, dtype, what)
