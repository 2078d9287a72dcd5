"""The fused LoRA linear op against a float64 reference, forward and all three gradients,
on every backend (Triton kernels, interpreted on CPU, and the torch path)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops import lora_linear, lora_linear_dropout_mask, lora_linear_ref
from tests.conftest import DEVICE
from tests.numerics import assert_close

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
    if dropout_p > 0:
        mask = lora_linear_dropout_mask(seed, x.numel() // k, k, dropout_p).reshape(x.shape)
        if keep.numel():  # the torch path hands its mask to the backward: the one it drew
            assert torch.equal(keep.reshape(x.shape), mask)
    x64 = pb.x.detach().double().requires_grad_()
    a64 = pb.lora_a.detach().double().requires_grad_()
    b64 = pb.lora_b.detach().double().requires_grad_()
    bias64 = pb.bias.double() if pb.bias is not None else None
    y64 = lora_linear_ref(x64, pb.weight.double(), bias64, a64, b64, SCALING, dropout_p, dropout_mask=mask)
    y64.backward(grad_y.double())

    dtype = pb.x.dtype
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    assert a.grad.dtype == pb.lora_a.dtype and b.grad.dtype == pb.lora_b.dtype
    assert_close(a.grad, a64.grad, dtype, "dA")
    assert_close(b.grad, b64.grad, dtype, "dB")


# M covers the three kernel regimes: decode (<= 16 rows), medium, and one large-M case below.
SHAPES = [(1, 33, 21), (7, 75, 93), (130, 75, 93)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("r", [1, 4, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_matches_reference(backend, m, k, n, r, dtype, dropout_p):
    check_against_reference(make_problem((m,), k, n, r, dtype), dropout_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
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
    """``y.sum()`` hands the backward a gradient with zero strides."""
    pb = make_problem((6,), 40, 24, 4, torch.float32)
    check_against_reference(pb, 0.2, grad_y=torch.ones(1, device=DEVICE).expand(6, 24))


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
