"""The fused LoRA linear op against a float64 reference, forward and all three gradients,
on every backend (Triton kernels, interpreted on CPU, and the torch path). In the interpreter
the kernels' bf16 cases are bf16 I/O with fp32 math (test id "bf16_io_fp32_math",
``tests.helpers.devices.dtype_id``): no coverage of their bf16 arithmetic."""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops import lora_linear, lora_linear_ref
from tests.helpers.devices import DEVICE, dtype_id
from tests.helpers.lora_problem import SCALING, check_against_reference, make_problem
from tests.helpers.numerics import assert_close, assert_within_bound, magnitudes

# M covers the three kernel regimes: decode (<= 16 rows), medium, and one large-M case below.
SHAPES = [(1, 33, 21), (7, 75, 93), (130, 75, 93)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("r", [1, 4, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_matches_reference(backend, m, k, n, r, dtype, dropout_p):
    check_against_reference(make_problem((m,), k, n, r, dtype), dropout_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_fp32_lora_weights_with_16bit_activations(backend, dtype, dropout_p):
    """PEFT's default: adapter weights in fp32 on a 16-bit model; output stays 16-bit."""
    check_against_reference(make_problem((9,), 70, 50, 8, dtype, lora_dtype=torch.float32), dropout_p)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_m_regime(backend, bias, dropout_p, dtype):
    """More than 512 rows: the large-M GEMM tiles and the split shrink."""
    check_against_reference(make_problem((600,), 200, 150, 5, dtype, bias=bias), dropout_p)


@pytest.mark.parametrize("r", [65, 130])
def test_rank_above_kernel_limit_uses_torch_path(backend, r):
    check_against_reference(make_problem((5,), 40, 30, r, torch.float32), 0.1)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_3d_input(backend, dropout_p):
    check_against_reference(make_problem((2, 9), 37, 29, 4, torch.float32), dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_non_contiguous_views(backend, dropout_p):
    """x strided along K and along rows, a transposed base weight, a transposed A."""
    pb = make_problem((2, 9), 74, 29, 4, torch.float32)
    pb.x = torch.randn(9, 2, 2 * 74, device=DEVICE)[..., ::2].transpose(0, 1)  # [2, 9, 74], k-stride 2
    pb.weight = pb.weight.t().contiguous().t()
    pb.lora_a = pb.lora_a.t().contiguous().t()
    assert not pb.x.is_contiguous() and not pb.weight.is_contiguous()
    check_against_reference(pb, dropout_p)
    pb.x = torch.randn(11, 100, device=DEVICE)[:, 13:87]  # row stride 100, k stride 1
    check_against_reference(pb, dropout_p)


def test_broadcast_grad_output(backend):
    """A gradient with zero row stride, as ``y.sum()`` hands the backward: one random row
    broadcast over the rows (random, so that dB's rows differ; ones would make them equal)."""
    pb = make_problem((6,), 40, 24, 4, torch.float32)
    check_against_reference(pb, 0.2, grad_y=torch.randn(1, 24, device=DEVICE).expand(6, 24))


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_empty_batch(backend, lead):
    pb = make_problem(lead, 20, 12, 4, torch.float32)
    x = pb.x.requires_grad_()
    a = pb.lora_a.requires_grad_()
    y = lora_linear(x, pb.weight, pb.bias, a, pb.lora_b, SCALING, 0.1, training=True)
    assert y.shape == (*lead, 12)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_only_some_gradients(backend):
    """x without grad (first layer) and A frozen: only dB is computed, still correct."""
    pb = make_problem((13,), 40, 24, 4, torch.float32)
    b = pb.lora_b.requires_grad_()
    y = lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, b, SCALING)
    g = torch.randn_like(y)
    y.backward(g)
    b64 = pb.lora_b.detach().double().requires_grad_()
    y64 = lora_linear_ref(pb.x.double(), pb.weight.double(), pb.bias.double(), pb.lora_a.double(), b64, SCALING)
    y64.backward(g.double())
    assert_close(b.grad, b64.grad, torch.float32, "dB")


def test_trainable_base_weight_gets_plain_linear_grads(backend):
    pb = make_problem((2, 5), 30, 20, 4, torch.float32)
    w = pb.weight.requires_grad_()
    bias = pb.bias.requires_grad_()
    y = lora_linear(pb.x, w, bias, pb.lora_a, pb.lora_b, SCALING)
    g = torch.randn_like(y)
    y.backward(g)
    w64 = pb.weight.detach().double().requires_grad_()
    bias64 = pb.bias.detach().double().requires_grad_()
    lora_linear_ref(pb.x.double(), w64, bias64, pb.lora_a.double(), pb.lora_b.double(), SCALING).backward(g.double())
    assert_close(w.grad, w64.grad, torch.float32, "dW")
    assert_close(bias.grad, bias64.grad, torch.float32, "dbias")


@pytest.mark.parametrize(("dtype", "error"), [
    pytest.param(torch.float16, "1.2 x rms", id="fp16-one-element-off-by-1.2x-a-typical-element"),
    pytest.param(torch.float32, "1e4 ulps", id="fp32-one-element-off-by-1e4-ulps"),
])
def test_one_wrong_element_passes_the_norm_check_but_not_the_elementwise_one(dtype, error):
    """The norm-wise check (``assert_close``) lets one far-off element through among ~140k
    right ones (1.2 / sqrt(140k) = 3.2e-3 < fp16's 4e-3); the element-wise bound
    (``assert_within_bound``) does not."""
    pb = make_problem((1500,), 75, 93, 16, dtype)
    y = lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING)
    inputs = [t.double() for t in (pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b)]
    y64 = lora_linear_ref(*inputs, SCALING)
    bound, _ = magnitudes(lambda *t: lora_linear_ref(*t, abs(SCALING)), inputs)
    assert_close(y, y64, dtype, "y")
    assert_within_bound(y, y64, bound, dtype, "y")
    wrong = y.clone()
    i = 777
    if error == "1.2 x rms":
        wrong.view(-1)[i] += 1.2 * y.float().pow(2).mean().sqrt().to(dtype)
    else:
        wrong.view(-1)[i] += 1e4 * torch.finfo(dtype).eps * wrong.view(-1)[i].abs()
    assert_close(wrong, y64, dtype, "y with one wrong element")
    with pytest.raises(AssertionError, match=r"y: 1 element\(s\) off by more than .* first at flat index 777"):
        assert_within_bound(wrong, y64, bound, dtype, "y")
