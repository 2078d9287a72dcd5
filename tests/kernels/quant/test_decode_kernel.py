"""The fused QLoRA decode kernel (fastpeft.kernels.quant.launch.decode_forward) in Triton's
interpreter against float64: every row count up to 16, odd N and K (4-bit blocks straddling rows,
a row of codes starting mid-byte), NF4 / FP4 with and without double quantization, uint8 and bf16
storage, int8 (bitsandbytes' and torchao's), every compiled (compute, adapter) dtype pair, every
padded rank, with and without bias. The float64 reference multiplies the weight the torch path
multiplies (``ref.dequantize`` in the compute dtype, exact) by x, so what is compared is the
kernel's dequantization in registers and its products; the epilogue's rounding is the compute
dtype's (the tolerance table's)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from fastpeft.methods.quantized_base import quantized_weight
from tests.helpers.devices import DEVICE, KERNELS_RUN
from tests.helpers.numerics import assert_close, assert_within_bound
from tests.helpers.quantized import TORCHAO, TORCHAO_INSTALLED, linear_4bit, linear_8bit, torchao_int8

pytestmark = pytest.mark.skipif(not KERNELS_RUN, reason="needs the Triton kernels (a GPU or the interpreter)")

PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float32), (torch.float16, torch.float16)]


def _weight(quant: str, k: int, n: int, compute: torch.dtype, bias: bool, blocksize: int = 64):
    linear = nn.Linear(k, n, bias=bias)
    if quant == TORCHAO:
        layer = torchao_int8(linear, DEVICE)
    elif quant == "int8":
        layer = linear_8bit(linear, DEVICE)
    else:
        name, storage = quant.split("-")[0], torch.bfloat16 if quant.endswith("bf16") else torch.uint8
        layer = linear_4bit(linear, name, "-dq" in quant, compute, storage, device=DEVICE, blocksize=blocksize)
    weight = dataclasses.replace(quantized_weight(layer), compute_dtype=compute)
    return weight, layer.bias


def _decode(x, weight, bias, s_scaled, b):
    from fastpeft.kernels.quant.launch import decode_forward

    return decode_forward(x, weight.quant_type, *weight.tensors(), weight.blocksize, weight.nested_blocksize, bias,
                          s_scaled, b)


def _reference(x, weight, bias, s_scaled, b):
    """float64 ``round_c(x W_c^T + b) + s' B^T`` and its magnitude bound."""
    w64 = weight.dequantize(x.dtype).double()
    base = x.double() @ w64.t() + (bias.double() if bias is not None else 0.0)
    lora = s_scaled.double() @ b.double().t()
    bound = x.double().abs() @ w64.abs().t() + s_scaled.double().abs() @ b.double().abs().t()
    if bias is not None:
        bound += bias.double().abs()
    return base.to(x.dtype).double() + lora, bound


@pytest.mark.parametrize("quant", ["nf4-dq", "nf4", "fp4-dq-bf16", "fp4", "int8",
                                   *([TORCHAO] if TORCHAO_INSTALLED else [])])
@pytest.mark.parametrize("k,n", [(96, 40), (33, 20), (512, 20)])
@pytest.mark.parametrize("compute,lora_dtype", PAIRS)
def test_against_float64(quant, k, n, compute, lora_dtype):
    for m, rank, has_bias in ((1, 1, False), (7, 17, True), (16, 64, True)):
        weight, bias = _weight(quant, k, n, compute, has_bias)
        bias = bias.to(compute) if bias is not None else None
        x = torch.randn(m, k, device=DEVICE).to(compute)
        s_scaled = torch.randn(m, rank, device=DEVICE).to(lora_dtype)
        b = torch.randn(n, rank, device=DEVICE).to(lora_dtype)
        got = _decode(x, weight, bias, s_scaled, b)
        want, bound = _reference(x, weight, bias, s_scaled, b)
        what = f"{quant} m={m} r={rank} bias={has_bias}"
        assert got.dtype == compute and got.shape == (m, n), what
        assert_close(got, want, compute, what)
        assert_within_bound(got, want, bound, compute, what)


@pytest.mark.parametrize("quant", ["nf4-dq", "fp4", "int8", *([TORCHAO] if TORCHAO_INSTALLED else [])])
def test_the_weight_in_registers_is_the_reference_exactly(quant):
    """x = rows of the identity and B = 0 read the kernel's dequantized weight out: column m of
    W, exactly the reference's value in the compute dtype (one nonzero product per output, so
    the sum adds nothing; fp16: exact on a GPU's tensor cores and in the interpreter)."""
    k, n, dtype = 48, 32, torch.float16
    weight, _ = _weight(quant, k, n, dtype, False)
    x = torch.eye(16, k, device=DEVICE, dtype=dtype)
    got = _decode(x, weight, None, torch.zeros(16, 1, device=DEVICE, dtype=dtype),
                  torch.zeros(n, 1, device=DEVICE, dtype=dtype))
    assert torch.equal(got, weight.dequantize(dtype)[:, :16].t())


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_block_sizes(blocksize):
    """bitsandbytes' other 4-bit block sizes (double quantized: 256 scales per nested block),
    read out exactly as in ``test_the_weight_in_registers_is_the_reference_exactly``."""
    k, n, dtype = 96, 40, torch.float16
    weight, _ = _weight("nf4-dq", k, n, dtype, False, blocksize)
    assert weight.blocksize == blocksize
    x = torch.eye(16, k, device=DEVICE, dtype=dtype)
    zeros = torch.zeros(16, 1, device=DEVICE, dtype=dtype), torch.zeros(n, 1, device=DEVICE, dtype=dtype)
    assert torch.equal(_decode(x, weight, None, *zeros), weight.dequantize(dtype)[:, :16].t())


def test_one_wrong_code_is_caught():
    """The comparison sees one flipped 4-bit code: the kernel reads every code it multiplies."""
    weight, _ = _weight("nf4-dq", 96, 40, torch.float32, False)
    x, s_scaled, b = (torch.randn(4, 96, device=DEVICE), torch.zeros(4, 1, device=DEVICE),
                      torch.zeros(40, 1, device=DEVICE))
    want, bound = _reference(x, weight, None, s_scaled, b)
    packed = weight.packed.clone()
    packed.view(-1)[1234] ^= 0x70  # the high nibble of one element of row 25
    got = _decode(x, dataclasses.replace(weight, packed=packed), None, s_scaled, b)
    with pytest.raises(AssertionError, match="element"):
        assert_within_bound(got, want, bound, torch.float32, "y")
