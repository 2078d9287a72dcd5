"""LoRALinear: PEFT-compatible parameters and init, merge/unmerge, and equal outputs to
HF PEFT's own lora.Linear with the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fastpeft
from tests.helpers.devices import DEVICE, dtype_id
from tests.helpers.numerics import assert_close


def test_parameters_named_shaped_and_frozen_like_peft():
    layer = fastpeft.LoRALinear(20, 12, r=4, device=DEVICE)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"weight": (12, 20), "bias": (12,), "lora_A.weight": (4, 20), "lora_B.weight": (12, 4)}
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}


def test_peft_default_init():
    torch.manual_seed(0)
    layer = fastpeft.LoRALinear(64, 32, r=8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a = sqrt(5) gives U(-1/sqrt(in), 1/sqrt(in))
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / math.sqrt(3)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("r,alpha,rslora,expected", [(8, 16, False, 2.0), (16, 8, True, 2.0), (4, 4, False, 1.0)])
def test_scaling(r, alpha, rslora, expected):
    assert fastpeft.LoRALinear(8, 8, r=r, lora_alpha=alpha, use_rslora=rslora).scaling == expected


def test_from_linear_shares_weight_without_copy():
    base = nn.Linear(20, 10, device=DEVICE)
    layer = fastpeft.LoRALinear.from_linear(base, r=3, lora_alpha=6)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad
    no_bias = fastpeft.LoRALinear.from_linear(nn.Linear(20, 10, bias=False), r=3)
    assert no_bias.bias is None
    assert no_bias(torch.randn(2, 20)).shape == (2, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_merge_unmerge_round_trip(backend, dtype):
    layer = fastpeft.LoRALinear(48, 40, r=4, lora_alpha=8, device=DEVICE, dtype=dtype)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 48, device=DEVICE, dtype=dtype)
    w0 = layer.weight.detach().clone()
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y_unmerged.double(), dtype, "merged forward")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, w0.double(), dtype, "weight after unmerge")
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_follows_training_mode(backend):
    layer = fastpeft.LoRALinear(32, 16, r=4, lora_dropout=0.5, device=DEVICE)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 32, device=DEVICE)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    assert not torch.equal(y1, layer(x))


@pytest.mark.parametrize("bad,exc", [(dict(r=0), ValueError), (dict(r=2.0), TypeError), (dict(lora_dropout=1.5), ValueError)])
def test_bad_layer_arguments(bad, exc):
    with pytest.raises(exc, match="r must|lora_dropout"):
        fastpeft.LoRALinear(8, 8, **bad)
    with pytest.raises(TypeError, match="nn.Linear"):
        fastpeft.LoRALinear.from_linear(nn.Conv1d(2, 2, 1))


peft = pytest.importorskip("peft")


class _OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(36, 28)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_grads_and_keys_as_peft(backend, rslora):
    torch.manual_seed(0)
    model = _OneLinear().to(DEVICE)
    config = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["proj"], use_rslora=rslora)
    peft_model = peft.get_peft_model(model, config)
    peft_layer = peft_model.base_model.model.proj
    nn.init.normal_(peft_layer.lora_B["default"].weight)

    ours = fastpeft.LoRALinear.from_linear(nn.Linear(36, 28).to(DEVICE), r=6, lora_alpha=12, use_rslora=rslora)
    with torch.no_grad():
        ours.weight.copy_(peft_layer.base_layer.weight)
        ours.bias.copy_(peft_layer.base_layer.bias)
        ours.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scaling == peft_layer.scaling["default"]

    x = torch.randn(3, 7, 36, device=DEVICE)
    y_peft, y_ours = peft_model(x), ours(x)
    torch.testing.assert_close(y_ours, y_peft)
    y_peft.square().sum().backward()
    y_ours.square().sum().backward()
    # Both are fp32 sums over the batch in different orders: compare by relative error.
    for name in ("lora_A", "lora_B"):
        expected = getattr(peft_layer, name)["default"].weight.grad
        assert_close(getattr(ours, name).weight.grad, expected, torch.float32, f"d{name}")

    saved = peft.get_peft_model_state_dict(peft_model)
    peft_keys = {k.removeprefix("base_model.model.proj.") for k in saved}
    ours_keys = {k for k, p in ours.named_parameters() if p.requires_grad}
    assert peft_keys == ours_keys


transformers = pytest.importorskip("transformers")


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    conv = transformers.pytorch_utils.Conv1D(n_out, n_in).to(DEVICE)  # weight [in, out]
    nn.init.normal_(conv.bias)
    return conv


def test_from_conv1d_fan_in_fan_out_forward_and_merge(backend):
    conv = _conv1d(40, 24)
    layer = fastpeft.LoRALinear.from_conv1d(conv, r=4, lora_alpha=8)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (40, 24)
    assert layer.weight is conv.weight and tuple(layer.weight.shape) == (40, 24)
    assert tuple(layer.lora_A.weight.shape) == (4, 40) and tuple(layer.lora_B.weight.shape) == (24, 4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 40, device=DEVICE)
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    expected = conv(x).double() + 2.0 * (x.double() @ a.t() @ b.t())
    assert_close(layer(x), expected, torch.float32, "fan_in_fan_out forward")
    w0 = conv.weight.detach().clone()
    layer.merge()
    assert_close(conv.weight, w0.double() + 2.0 * (b @ a).t(), torch.float32, "merged [in, out] weight")
    assert_close(layer(x), expected, torch.float32, "merged forward")
    assert layer.base_module() is conv
    assert_close(conv(x), expected, torch.float32, "unwrapped merged Conv1D")
    layer.unmerge()
    assert_close(conv.weight, w0.double(), torch.float32, "weight after unmerge")


def test_from_conv1d_same_outputs_and_grads_as_peft(backend):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", _conv1d(36, 28))
    config = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["proj"], fan_in_fan_out=True)
    peft_layer = peft.get_peft_model(model, config).base_model.model.proj
    nn.init.normal_(peft_layer.lora_B["default"].weight)
    ours = fastpeft.LoRALinear.from_conv1d(_conv1d(36, 28), r=6, lora_alpha=12)
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(ours, name).copy_(getattr(peft_layer.base_layer, name))
        for name in ("lora_A", "lora_B"):
            getattr(ours, name).weight.copy_(getattr(peft_layer, name)["default"].weight)
    x = torch.randn(4, 36, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_peft, y_ours = peft_layer(x), ours(x2)
    assert_close(y_ours, y_peft, torch.float32, "forward")
    y_peft.square().sum().backward()
    y_ours.square().sum().backward()
    assert_close(x2.grad, x.grad, torch.float32, "dx")
    for name in ("lora_A", "lora_B"):
        expected = getattr(peft_layer, name)["default"].weight.grad
        assert_close(getattr(ours, name).weight.grad, expected, torch.float32, f"d{name}")


def test_lora_dtype_and_init_options():
    base = nn.Linear(32, 16, dtype=torch.bfloat16)
    layer = fastpeft.LoRALinear.from_linear(base, r=4, lora_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    torch.manual_seed(0)
    gaussian = fastpeft.LoRALinear.from_linear(nn.Linear(256, 64), r=4, init_lora_weights="Gaussian")
    assert abs(gaussian.lora_A.weight.std().item() - 1 / 4) < 0.02 and not gaussian.lora_B.weight.any()
    random_b = fastpeft.LoRALinear.from_linear(nn.Linear(256, 64), r=4, init_lora_weights=False)
    assert random_b.lora_B.weight.abs().max() <= 1 / 2 and random_b.lora_B.weight.std() > 0.1
    with pytest.raises(ValueError, match="init_lora_weights"):
        fastpeft.LoRALinear.from_linear(nn.Linear(8, 8), init_lora_weights="pissa")
    with pytest.raises(TypeError, match="Conv1D"):
        fastpeft.LoRALinear.from_conv1d(nn.Linear(8, 8))


def test_base_module_round_trip_for_linear():
    base = nn.Linear(20, 10, bias=False)
    layer = fastpeft.LoRALinear.from_linear(base, r=2).eval()
    unwrapped = layer.base_module()
    assert unwrapped is base and unwrapped.weight is layer.weight and unwrapped.bias is None
    assert not unwrapped.training


@pytest.mark.parametrize("alpha,exc", [("16", TypeError), (float("inf"), ValueError), (float("nan"), ValueError)])
def test_bad_lora_alpha_is_refused_at_construction(alpha, exc):
    with pytest.raises(exc, match="lora_alpha"):
        fastpeft.LoRALinear(8, 8, lora_alpha=alpha)
    with pytest.raises(exc, match="lora_alpha"):
        fastpeft.LoRALinear.from_linear(nn.Linear(8, 8), lora_alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_layers_get_fp32_adapters_like_peft_and_inject(dtype):
    """``from_linear`` and the constructor make fp32 A and B on a 16-bit base (PEFT's and
    ``inject``'s default); ``lora_dtype`` still overrides it."""
    assert fastpeft.LoRALinear.from_linear(nn.Linear(8, 6).to(dtype)).lora_A.weight.dtype == torch.float32
    layer = fastpeft.LoRALinear(8, 6, dtype=dtype)
    assert layer.weight.dtype == dtype and layer.lora_B.weight.dtype == torch.float32
    kept = fastpeft.LoRALinear.from_linear(nn.Linear(8, 6).to(dtype), lora_dtype=dtype)
    assert kept.lora_A.weight.dtype == dtype


def test_wrap_dispatches_on_the_base_layer_kind_and_refuses_others():
    """``LoRALinear.wrap`` takes any of ``BASE_LAYER_KINDS`` (first match), as ``from_linear`` /
    ``from_conv1d`` would, and refuses another module naming the kinds it takes."""
    from fastpeft.methods.base_layers import BASE_LAYER_KINDS, CONV1D, LINEAR, base_layer_kind

    transformers = pytest.importorskip("transformers")
    linear, conv1d = torch.nn.Linear(6, 4), transformers.pytorch_utils.Conv1D(4, 6)  # both [in 6, out 4]
    assert base_layer_kind(linear) is LINEAR and base_layer_kind(conv1d) is CONV1D
    assert base_layer_kind(torch.nn.Embedding(3, 4)) is None
    for base, fan_in_fan_out in ((linear, False), (conv1d, True)):
        layer = fastpeft.LoRALinear.wrap(base, r=2)
        assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (6, 4, fan_in_fan_out)
        assert layer.weight is base.weight
    with pytest.raises(TypeError, match="base must be one of " + ", ".join(k.name for k in BASE_LAYER_KINDS)):
        fastpeft.LoRALinear.wrap(torch.nn.Embedding(3, 4))
