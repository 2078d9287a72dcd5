"""The reference dequantization of quantized base weights (fastpeft.kernels.quant.ref) is
bitsandbytes' own, bit for bit: its reference implementation (the generic one, whose results
its CUDA kernels share) on every shape, dtype, storage and with or without double
quantization; its CPU kernel and its layers' training-mode forward where that kernel is right
(K a multiple of the block size); and the int8 layers' training-mode forward."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from fastpeft.kernels.quant.bitsandbytes_ops import bitsandbytes_dequantize_4bit, bitsandbytes_dequantizes_exactly
from fastpeft.kernels.quant.ref import dequantize
from fastpeft.methods.quantized_base import quantized_weight
from tests.helpers.devices import DEVICE
from tests.helpers.quantized import TORCHAO_INSTALLED, linear_4bit, linear_8bit, torchao_nf4

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dequantize_layer(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    s = layer.weight.quant_state
    nested = s.state2 if s.nested else None
    return dequantize(s.quant_type, layer.weight.data, s.absmax, s.code, nested and nested.absmax,
                      nested and nested.code, s.offset if nested else None, s.blocksize,
                      nested.blocksize if nested else 0, tuple(s.shape), dtype)


def _bnb_scales(s) -> torch.Tensor:
    if not s.nested:
        return s.absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(s.absmax, s.state2.absmax, s.state2.code,
                                                               s.state2.blocksize, torch.float32) + s.offset


# (K, N): K a multiple of the 64-element blocks; blocks that straddle rows (96, 200); a last
# partial block (34 x 12 = 408 = 6 x 64 + 24).
SHAPES = [(128, 64), (96, 40), (200, 24), (34, 12)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(("nf4", "fp4"), (False, True))))
def test_4bit_equals_bitsandbytes(k, n, quant_type, double_quant):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    for weight_dtype, dtype, storage in itertools.product(DTYPES, DTYPES, (torch.uint8, torch.bfloat16)):
        linear = nn.Linear(k, n)
        layer = linear_4bit(linear, quant_type, double_quant, dtype, storage, weight_dtype)
        s = layer.weight.quant_state
        got = _dequantize_layer(layer, dtype)
        reference = _dequantize_4bit_compute(layer.weight.data.view(torch.uint8).reshape(-1), _bnb_scales(s),
                                             _get_4bit_code(quant_type, "cpu"), s.blocksize, s.shape, dtype)
        assert torch.equal(got, reference), (weight_dtype, dtype, storage)
        w = quantized_weight(layer)
        exact = bitsandbytes_dequantizes_exactly(w.packed.device, k, w.blocksize)
        assert exact == (k % s.blocksize == 0)  # bitsandbytes' CPU kernel only where it is right
        if exact:  # then it, and bitsandbytes' layer's forward, are the reference bit for bit
            cpu = bitsandbytes_dequantize_4bit(w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset,
                                               w.blocksize, w.nested_blocksize, quant_type, w.shape, dtype)
            assert torch.equal(got, cpu)
            x = torch.randn(3, k, dtype=dtype)
            assert torch.equal(layer(x), nn.functional.linear(x, got, layer.bias.to(dtype)))
        # the quantization error is a 4-bit one: the dequantized weight is near the original
        assert (got.float() - linear.weight.float()).norm() / linear.weight.norm() < 0.2


@pytest.mark.parametrize("k,n", [(128, 64), (96, 40)])
def test_int8_equals_the_training_mode_forward(k, n):
    layer = linear_8bit(nn.Linear(k, n))
    for dtype in DTYPES:
        x = torch.randn(5, k, dtype=dtype)
        want = layer(x)  # moves CB / SCB into layer.state
        cb = layer.state.CB if layer.state.CB is not None else layer.weight.CB
        scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        w = dequantize("int8", cb, scb, None, None, None, None, 0, 0, (n, k), dtype)
        assert torch.equal(nn.functional.linear(x, w, layer.bias.to(dtype)), want)


def test_bitsandbytes_own_kernels_where_they_are_the_reference():
    """On CUDA bitsandbytes' kernels define the reference (whatever the shape: the GPU run
    compares them); on the CPU only rows of whole blocks below 2048; nowhere else."""
    cuda, cpu, meta = torch.device("cuda"), torch.device("cpu"), torch.device("meta")
    assert bitsandbytes_dequantizes_exactly(cuda, 96, 64)
    assert bitsandbytes_dequantizes_exactly(cpu, 128, 64) and not bitsandbytes_dequantizes_exactly(cpu, 96, 64)
    assert not bitsandbytes_dequantizes_exactly(cpu, 4096, 2048)
    assert not bitsandbytes_dequantizes_exactly(meta, 128, 64)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bitsandbytes' CUDA kernels: the GPU script runs this")
@pytest.mark.parametrize("k,n", [(96, 40), (34, 12), (4096, 3)])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_bitsandbytes_cuda_dequantization_is_the_reference(k, n, quant_type, double_quant):
    """What the torch path runs on CUDA (bitsandbytes' own kernels) equals ``ref`` bit for bit,
    blocks straddling rows included."""
    for dtype, storage in itertools.product(DTYPES, (torch.uint8, torch.bfloat16)):
        layer = linear_4bit(nn.Linear(k, n), quant_type, double_quant, dtype, storage, device=DEVICE)
        w = quantized_weight(layer)
        got = bitsandbytes_dequantize_4bit(w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize,
                                           w.nested_blocksize, quant_type, w.shape, dtype)
        assert torch.equal(got, w.dequantize(dtype)), (dtype, storage)


@pytest.mark.skipif(not TORCHAO_INSTALLED, reason="needs torchao")
@pytest.mark.parametrize("shape", [(128, 128), (256, 64), (16384, 3), (3, 16384)])
def test_torchao_nf4_equals_its_original_weight(shape):
    """torchao's NF4Tensor (blocks straddling rows, odd K) dequantized as ``ref`` does it: its
    ``get_original_weight()`` bit for bit, in each weight dtype, and cast to each dtype."""
    from fastpeft.methods.quantized_base import quantized_weight

    for weight_dtype in DTYPES:
        layer = torchao_nf4(nn.Linear(shape[1], shape[0]).to(weight_dtype))
        original = layer.weight.get_original_weight()
        w = quantized_weight(layer)
        for dtype in DTYPES:
            assert torch.equal(w.dequantize(dtype), original.to(dtype)), (weight_dtype, dtype)
