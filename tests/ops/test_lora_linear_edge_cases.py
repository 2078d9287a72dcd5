"""The LoRA op where PEFT's formula still works and a fused op could easily not: empty
in/out features, float64, double backward, and an fp32 adapter on a 16-bit model with a
rank-r intermediate beyond the 16-bit range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops import lora_linear, lora_linear_dropout_mask, lora_linear_ref
from tests.helpers.dropout_replay import replayed_keep_mask
from tests.helpers.fp32_adapter_overflow import OVERFLOW_SCALING, overflowing_fp32_adapter_case
from tests.helpers.numerics import TOLERANCE, assert_close, relative_error
from tests.helpers.lora_problem import SCALING, check_against_reference, make_problem


@pytest.mark.parametrize("k,n", [(0, 12), (20, 0), (0, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_empty_features_match_f_linear(backend, k, n, bias):
    """K = 0 gives the bias (or zeros), as ``F.linear`` does; N = 0 an empty output; the
    gradients have their parameters' shapes (dB is zero: s has no terms when K = 0)."""
    pb = make_problem((2, 3), k, n, 4, torch.float32, bias=bias)
    x, a, b = (t.requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b))
    y = lora_linear(x, pb.weight, pb.bias, a, b, SCALING, 0.1, training=True)
    assert torch.equal(y, F.linear(pb.x, pb.weight, pb.bias))
    y.backward(torch.randn_like(y))
    assert x.grad.shape == x.shape and a.grad.shape == a.shape and b.grad.shape == b.shape
    if k == 0:
        assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_float64_matches_reference(backend, dropout_p):
    """float64 runs (on the torch path, whatever the backend) to float64 precision."""
    check_against_reference(make_problem((3, 7), 45, 31, 5, torch.float64), dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_float64_gradcheck_and_gradgradcheck(dropout_p):
    """Finite differences agree with the backward and with the double backward. With
    dropout the global seed is reset in every call, so each evaluation draws the same mask."""
    pb = make_problem((2, 3), 6, 5, 2, torch.float64)

    def op(x, a, b, weight):
        torch.manual_seed(0)
        return lora_linear(x, weight, pb.bias, a, b, SCALING, dropout_p, training=True)

    inputs = tuple(t.requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b, pb.weight))
    assert torch.autograd.gradcheck(op, inputs)
    assert torch.autograd.gradgradcheck(op, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_double_backward_gradient_penalty(backend, dtype, dropout_p):
    """``create_graph=True`` then a loss on the gradient (a gradient penalty): the second
    backward's dx, dA and dB match float64 PEFT math with the same dropout mask."""
    pb = make_problem((4, 5), 37, 23, 4, dtype, lora_dtype=torch.float32)
    torch.manual_seed(1)
    x, a, b = (t.detach().requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b))
    y = lora_linear(x, pb.weight, pb.bias, a, b, SCALING, dropout_p, training=True)
    (gx,) = torch.autograd.grad(y.float().pow(2).sum(), x, create_graph=True)
    gx.float().pow(2).sum().backward()

    torch.manual_seed(1)
    seed = draw_seed(x.device) if dropout_p else None
    mask = replayed_keep_mask(seed, 20, 37, dropout_p, lora_linear_dropout_mask).reshape(x.shape) if dropout_p else None
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b))
    y64 = lora_linear_ref(x64, pb.weight.double(), pb.bias.double(), a64, b64, SCALING, dropout_p, dropout_mask=mask)
    (gx64,) = torch.autograd.grad(y64.pow(2).sum(), x64, create_graph=True)
    gx64.pow(2).sum().backward()
    assert_close(gx, gx64, dtype, "first-order dx")
    for got, want, what in ((x.grad, x64.grad, "dx"), (a.grad, a64.grad, "dA"), (b.grad, b64.grad, "dB")):
        assert_close(got, want, dtype, f"double-backward {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapter_branch_stays_fp32_like_peft(monkeypatch, dtype):
    """fp32 adapters on a 16-bit base (PEFT's default) with ``s * scaling`` far beyond
    fp16's range (scaling 64, |x| ~ 1000): the torch path keeps the rank-r side in fp32
    through the B product, as PEFT does, so the output is finite and no less accurate than
    PEFT's own layer against float64."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    layer, x = overflowing_fp32_adapter_case(dtype)
    base, scaling = layer.base_layer, OVERFLOW_SCALING
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ours = lora_linear(x, base.weight, base.bias, a, b, scaling)
    theirs = layer(x)
    exact = lora_linear_ref(x.double(), base.weight.double(), base.bias.double(), a.double(), b.double(), scaling)
    assert torch.isfinite(ours).all()
    our_err, peft_err = relative_error(ours, exact), relative_error(theirs, exact)
    assert our_err <= max(1.01 * peft_err, TOLERANCE[dtype] / 100), (our_err, peft_err)
