"""The one-launch Triton dequantization (fastpeft.kernels.quant.launch) in Triton's
interpreter, against the reference (fastpeft.kernels.quant.ref) on odd shapes (blocks that
straddle rows, a partial last block), NF4 / FP4 with and without double quantization, uint8
and bf16 storage, and int8: bit for bit in fp32 and fp16. In bf16 the interpreter truncates
where a GPU rounds to nearest (KERNEL_NOTES.md), so there the kernel's output is the reference's
fp32 values truncated, bit for bit (the GPU run checks the rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastpeft.methods.quantized_base import quantized_weight
from tests.helpers.devices import DEVICE, KERNELS_RUN
from tests.helpers.quantized import TORCHAO, TORCHAO_INSTALLED, linear_4bit, linear_8bit, torchao_int8

pytestmark = pytest.mark.skipif(not KERNELS_RUN, reason="needs the Triton kernels (a GPU or the interpreter)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _expected(weight, dtype: torch.dtype) -> torch.Tensor:
    if dtype != torch.bfloat16 or DEVICE.type == "cuda":
        return weight.dequantize(dtype)
    exact = weight.dequantize(torch.float32)
    return (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # truncated


def _launch(weight, dtype):
    from fastpeft.kernels.quant import launch

    return launch.dequantize(weight.quant_type, *weight.tensors(), weight.blocksize, weight.nested_blocksize,
                             weight.shape, dtype)


@pytest.mark.parametrize("k,n", [(96, 40), (34, 12), (2048, 3)])
@pytest.mark.parametrize("quant_type,double_quant,storage", [
    ("nf4", True, torch.uint8), ("nf4", False, torch.bfloat16), ("fp4", True, torch.bfloat16),
    ("fp4", False, torch.uint8)])
def test_4bit(k, n, quant_type, double_quant, storage):
    for dtype in DTYPES:
        weight = quantized_weight(linear_4bit(nn.Linear(k, n), quant_type, double_quant, dtype, storage,
                                              device=DEVICE))
        assert torch.equal(_launch(weight, dtype), _expected(weight, dtype)), dtype


@pytest.mark.parametrize("quant", ["int8", *([TORCHAO] if TORCHAO_INSTALLED else [])])
def test_int8(quant):
    """bitsandbytes' int8 (CB * SCB / 127) and torchao's int8 weight-only (qdata * scale)."""
    if quant == TORCHAO:
        layer = torchao_int8(nn.Linear(96, 40), DEVICE)
    else:
        layer = linear_8bit(nn.Linear(96, 40), DEVICE)
        layer(torch.randn(2, 96, device=DEVICE))  # bitsandbytes moves CB / SCB into the layer's state
    weight = quantized_weight(layer)
    for dtype in DTYPES:
        assert torch.equal(_launch(weight, dtype), _expected(weight, dtype)), dtype


@pytest.mark.parametrize("m,dequantizations,decodes", [(3, 1, 1), (17, 2, 0)])
def test_the_op_runs_the_kernels_where_they_are_in_use(m, dequantizations, decodes, monkeypatch):
    """Up to 16 rows the forward is the fused decode kernel and only the backward dequantizes;
    above, the forward dequantizes too (one launch each); the torch backend launches nothing.
    (bf16 compute with fp32 adapters and N, K multiples of 16: what the decode kernel takes on a
    GPU too.)"""
    from fastpeft.kernels.quant import launch
    from fastpeft.ops import qlora_linear

    calls = []  # the launchers, counted, computing the reference's result
    monkeypatch.setattr(launch, "dequantize", lambda *args: calls.append("dequantize") or launch_reference(*args))
    decode = launch.decode_forward
    monkeypatch.setattr(launch, "decode_forward", lambda *args: calls.append("decode") or decode(*args))
    layer = linear_4bit(nn.Linear(96, 48), compute_dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(m, 96, device=DEVICE).to(torch.bfloat16).requires_grad_()
    a, b = torch.randn(4, 96, device=DEVICE, requires_grad=True), torch.randn(48, 4, device=DEVICE)
    for choice, expected in (("torch", []), ("triton", ["decode"] * decodes + ["dequantize"] * dequantizations)):
        monkeypatch.setenv("FASTPEFT_BACKEND", choice)
        calls.clear()
        qlora_linear(x, quantized_weight(layer), layer.bias, a, b, 2.0).sum().backward()
        assert sorted(calls) == sorted(expected)


def launch_reference(quant_type, *args):
    from fastpeft.kernels.quant.ref import dequantize

    return dequantize(quant_type, *args)
