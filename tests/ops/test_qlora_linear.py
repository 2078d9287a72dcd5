"""The LoRA op on a quantized base (fastpeft.ops.qlora_linear, torch path): forward and every
gradient against float64 on bitsandbytes' NF4 (double quantization), FP4 and int8 weights with
and without dropout, 3-D and non-contiguous x, M = 0; the base part bit for bit bitsandbytes'
own layer's output; registration (opcheck, torch.compile fullgraph); clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.methods.quantized_base import quantized_weight
from fastpeft.ops import lora_linear_dropout_mask, lora_linear_ref, qlora_linear
from tests.helpers.devices import BACKENDS, DEVICE
from tests.helpers.numerics import assert_close, assert_within_bound, magnitudes
from tests.helpers.quantized import TORCHAO, TORCHAO_INSTALLED, linear_4bit, linear_8bit, torchao_int8, torchao_nf4

SCALING = 2.0
K, N, R = 96, 40, 6  # blocks of 64 straddle rows; partial everything


@pytest.fixture(autouse=True)
def on_device():
    """The tests' tensors on DEVICE (the GPU where there is one: the GPU script runs this file),
    but for the tests that name the CPU."""
    with torch.device(DEVICE):
        yield


def _base(quant: str, compute_dtype: torch.dtype) -> nn.Module:
    linear = nn.Linear(K, N)
    if quant == TORCHAO:
        return torchao_int8(linear, DEVICE)
    if quant == "int8":
        return linear_8bit(linear, DEVICE)
    return linear_4bit(linear, quant.split("-")[0], quant.endswith("-dq"), compute_dtype, device=DEVICE)


def _op(x, weight, bias, a, b, p, seed):
    return torch.ops.fastpeft.qlora_linear(x, *weight.tensors(), bias, a, b, weight.quant_type, weight.blocksize,
                                           weight.nested_blocksize, weight.out_features,
                                           weight.compute_dtype or x.dtype, SCALING, p, seed)


@pytest.mark.parametrize("quant", ["nf4-dq", "nf4", "fp4-dq", "int8", *([TORCHAO] if TORCHAO_INSTALLED else [])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("layout", ["3d", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradients_against_float64(quant, dtype, dropout_p, layout, backend, monkeypatch):
    """``backend`` triton: the weight dequantized by the Triton kernel (the interpreter's bf16
    rounding differs from a GPU's by an ulp, within the tolerance)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    layer = _base(quant, dtype)
    weight = dataclasses.replace(quantized_weight(layer), compute_dtype=dtype)
    x = torch.randn(3, 7, K).to(dtype) if layout == "3d" else torch.randn(K, 11).to(dtype).t()
    x.requires_grad_()
    a = torch.randn(R, K, requires_grad=True)
    b = torch.randn(N, R, requires_grad=True)
    seed = draw_seed(x.device) if dropout_p else x.new_empty(0, dtype=torch.int64)
    y, _, keep = _op(x, weight, layer.bias, a, b, dropout_p, seed)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    m = x.numel() // K
    mask = lora_linear_dropout_mask(seed, m, K, dropout_p, keep=keep).reshape(x.shape) if dropout_p else None
    w64 = weight.dequantize(dtype).double()  # the values the op multiplies
    bias64 = layer.bias.to(dtype).double()
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y64 = lora_linear_ref(leaves[0], w64, bias64, leaves[1], leaves[2], SCALING, dropout_p, dropout_mask=mask)
    y64.backward(grad_y.double())
    y_bound, (dx_bound, _, _, da_bound, db_bound) = magnitudes(
        lambda *t: lora_linear_ref(*t, SCALING, dropout_p, dropout_mask=mask),
        [x, w64, bias64, a, b], grad_y)
    assert y.dtype == dtype and a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    for what, got, want, bound in (("y", y, y64, y_bound), ("dx", x.grad, leaves[0].grad, dx_bound),
                                   ("dA", a.grad, leaves[1].grad, da_bound), ("dB", b.grad, leaves[2].grad, db_bound)):
        assert_close(got, want, dtype, what)
        assert_within_bound(got, want, bound, dtype, what)


@pytest.mark.parametrize("quant", ["nf4-dq", "fp4", "int8"])
def test_the_base_part_is_bitsandbytes_own_output(quant):
    """With B = 0 the op is the base layer, bit for bit, in bitsandbytes' training-mode forward
    on the CPU (K = 128: a multiple of the block size, where bitsandbytes' CPU kernel is right;
    on CUDA its int8 layer multiplies int8 activations)."""
    with torch.device("cpu"):
        linear = nn.Linear(128, 48)
        layer = linear_8bit(linear) if quant == "int8" else linear_4bit(linear, quant[:3], quant.endswith("-dq"))
        x = torch.randn(5, 128)
        want = layer(x)
        got = qlora_linear(x, quantized_weight(layer), layer.bias, torch.randn(4, 128), torch.zeros(48, 4), SCALING)
    assert torch.equal(got, want)


@pytest.mark.skipif(not TORCHAO_INSTALLED, reason="needs torchao")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torchao_nf4_base_against_float64_and_its_own_output(dtype, backend, monkeypatch):
    """On torchao's NF4Tensor (256 x 64: to_nf4's smallest) the op is its layer's output plus
    the LoRA term: y and every gradient against float64 on the weight it dequantizes, and with
    B = 0 torchao's own layer bit for bit (the bias added after the product is rounded, as
    torchao adds it); the kernels have no NF4Tensor path, so ``backend`` triton runs
    the torch composition."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    k, n = 256, 64
    layer = torchao_nf4(nn.Linear(k, n).to(dtype))
    weight = quantized_weight(layer)
    x = torch.randn(5, k).to(dtype).requires_grad_()
    a, b = torch.randn(R, k, requires_grad=True), torch.randn(n, R, requires_grad=True)
    bias = layer.bias.detach()
    base = qlora_linear(x, weight, bias, a, torch.zeros(n, R), SCALING)
    assert torch.equal(base, layer(x))
    y = qlora_linear(x, weight, bias, a, b, SCALING)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    w64 = weight.dequantize(dtype).double()
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y64 = lora_linear_ref(leaves[0], w64, bias.double(), leaves[1], leaves[2], SCALING, 0.0)
    y64.backward(grad_y.double())
    for what, got, want in (("y", y, y64), ("dx", x.grad, leaves[0].grad), ("dA", a.grad, leaves[1].grad),
                            ("dB", b.grad, leaves[2].grad)):
        assert_close(got, want, dtype, what)


@pytest.mark.skipif(not TORCHAO_INSTALLED, reason="needs torchao")
def test_the_base_part_is_torchaos_own_output_to_rounding():
    """With B = 0 the op is torchao's int8 weight-only layer up to the order of rounding (torchao
    multiplies by the int8 values, then scales the products: ~1 ulp, KERNEL_NOTES)."""
    layer = torchao_int8(nn.Linear(128, 48), DEVICE)
    x = torch.randn(5, 128)
    got = qlora_linear(x, quantized_weight(layer), layer.bias, torch.randn(4, 128), torch.zeros(48, 4), SCALING)
    assert_close(got, layer(x), torch.float32, "y")


def test_no_rows():
    layer = _base("nf4-dq", torch.float32)
    x = torch.randn(0, K, requires_grad=True)
    a, b = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    y = qlora_linear(x, quantized_weight(layer), layer.bias, a, b, SCALING, 0.1, True)
    assert y.shape == (0, N)
    y.sum().backward()
    assert x.grad.shape == (0, K) and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [4, 20])
def test_registration_and_compile(backend, m, monkeypatch):
    """``backend`` triton: 4 rows run the fused decode kernel, 20 the dequantize-then-GEMM path."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    layer = _base("nf4-dq", torch.float32)
    weight = quantized_weight(layer)
    x = torch.randn(m, K, requires_grad=True)
    a, b = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpeft.qlora_linear.default,
                          (x, *weight.tensors(), layer.bias, a, b, "nf4", weight.blocksize, weight.nested_blocksize,
                           N, torch.float32, SCALING, 0.0, x.new_empty(0, dtype=torch.int64)))
    compiled = torch.compile(lambda t: qlora_linear(t, weight, layer.bias, a, b, SCALING), fullgraph=True)
    torch.testing.assert_close(compiled(x), qlora_linear(x, weight, layer.bias, a, b, SCALING))


def test_double_backward_is_refused_clearly():
    layer = _base("nf4-dq", torch.float32)
    x = torch.randn(4, K, requires_grad=True)
    a, b = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    y = qlora_linear(x, quantized_weight(layer), layer.bias, a, b, SCALING)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), a, create_graph=True)


@pytest.mark.parametrize("change,error,message", [
    (lambda w, x, a: (w, x[:, :-1], a), ValueError, "in_features 96"),
    (lambda w, x, a: (w, x.long(), a), TypeError, "x "),
    (lambda w, x, a: (w, x, a[:, :-1]), ValueError, "lora_a"),
    (lambda w, x, a: (dataclasses.replace(w, quant_type="nf8"), x, a), ValueError, "quant_type"),
    (lambda w, x, a: (dataclasses.replace(w, absmax=w.absmax[:-1]), x, a), ValueError, "absmax"),
    (lambda w, x, a: (dataclasses.replace(w, offset=None), x, a), ValueError, "together"),
    (lambda w, x, a: ("not a weight", x, a), TypeError, "QuantizedWeight"),
])
def test_bad_arguments_are_named(change, error, message):
    layer = _base("nf4-dq", torch.float32)
    weight, x, a = change(quantized_weight(layer), torch.randn(4, K), torch.randn(R, K))
    with pytest.raises(error, match=message):
        qlora_linear(x, weight, layer.bias, a, torch.randn(N, R), SCALING)
