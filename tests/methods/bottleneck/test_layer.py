"""``fastpeft.BottleneckAdapter``: numerics against the float64 reference (forward and every
gradient), AdapterHub's sizes and inits, learned scaling, dropout, and argument errors."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.kernels.bottleneck.ref import bottleneck_adapter_ref
from tests.helpers.numerics import assert_close


def _randomize(layer: fastpeft.BottleneckAdapter, seed: int = 0) -> None:
    """Fresh non-zero values in every parameter (inits leave biases zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator) + (0.5 if param.numel() == 1 else 0.0))


@pytest.mark.parametrize("activation, scaling, residual, shape", [
    ("relu", 1.0, False, (7, 37)),
    ("gelu", 0.75, True, (2, 5, 37)),
    ("gelu_new", "learned", False, (3, 4, 37)),
    ("swish", "learned", True, (1, 37)),
    ("linear", -2.0, False, (9, 37)),
])
def test_layer_matches_float64_reference(backend, activation, scaling, residual, shape):
    torch.manual_seed(0)
    layer = fastpeft.BottleneckAdapter(37, reduction_factor=4, non_linearity=activation, scaling=scaling)
    _randomize(layer)
    assert layer.bottleneck_size == 9  # int(37 // 4)
    h = torch.randn(shape).requires_grad_(True)
    res = torch.randn(shape).requires_grad_(True) if residual else None
    out = layer(h, residual=res)
    grad_out = torch.randn(out.shape)
    out.backward(grad_out)

    ref_params = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    h64 = h.detach().double().requires_grad_(True)
    res64 = res.detach().double().requires_grad_(True) if residual else None
    ref_scaling = ref_params["scaling"].reshape(()) if scaling == "learned" else scaling
    expected = bottleneck_adapter_ref(
        h64, ref_params["adapter_down.weight"], ref_params["adapter_down.bias"], ref_params["adapter_up.weight"],
        ref_params["adapter_up.bias"], activation=activation, scaling=ref_scaling, residual=res64,
    )
    expected.backward(grad_out.double())
    assert_close(out, expected, torch.float32, "out")
    assert_close(h.grad, h64.grad, torch.float32, "dh")
    if residual:
        assert_close(res.grad, res64.grad, torch.float32, "d residual")
    for name, param in layer.named_parameters():
        assert_close(param.grad, ref_params[name].grad, torch.float32, f"d {name}")


@pytest.mark.parametrize("hidden, factor, expected", [(768, 16, 48), (32, 64, 1), (10, 0.5, 20), (37, 3.5, 10)])
def test_bottleneck_size_is_adapterhubs(hidden, factor, expected):
    assert fastpeft.BottleneckAdapter(hidden, reduction_factor=factor).bottleneck_size == expected
    assert fastpeft.BottleneckAdapter(hidden, bottleneck_size=5, reduction_factor=factor).bottleneck_size == 5


def test_bert_init_is_normal_002_with_zero_biases():
    torch.manual_seed(0)
    layer = fastpeft.BottleneckAdapter(512, bottleneck_size=64)
    for linear in (layer.adapter_down, layer.adapter_up):
        assert abs(linear.weight.std().item() - 0.02) < 0.001
        assert abs(linear.weight.mean().item()) < 0.001
        assert not linear.bias.any()


@pytest.mark.parametrize("init", ["mam_adapter", "mam", "lora"])
def test_identity_inits_add_exactly_nothing(init):
    torch.manual_seed(0)
    layer = fastpeft.BottleneckAdapter(24, bottleneck_size=8, init=init, scaling=3.0)
    assert layer.adapter_down.weight.any() and not layer.adapter_up.weight.any()
    assert layer.is_identity()
    h, res = torch.randn(5, 24), torch.randn(5, 24)
    assert torch.equal(layer(h), h)
    assert torch.equal(layer(h, residual=res), res)


def test_houlsby_init_is_truncated_normal():
    torch.manual_seed(0)
    layer = fastpeft.BottleneckAdapter(256, bottleneck_size=64, init="houlsby")
    for linear in (layer.adapter_down, layer.adapter_up):
        assert linear.weight.abs().max() <= 0.02
        assert 0.007 < linear.weight.std().item() < 0.0095  # N(0, 0.01^2) cut at +-2 sigma: std 0.0088
        assert not linear.bias.any()


def test_learned_scaling_is_a_trainable_scalar_starting_at_one():
    layer = fastpeft.BottleneckAdapter(16, bottleneck_size=4, scaling="learned")
    assert layer.learned_scaling and layer.scaling.shape == (1,) and layer.scaling.item() == 1.0
    assert "scaling" in dict(layer.named_parameters())
    _randomize(layer)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.scaling.grad is not None and layer.scaling.grad.abs().item() > 0
    with torch.no_grad():
        layer.scaling.zero_()
    assert layer.is_identity()


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = fastpeft.BottleneckAdapter(32, bottleneck_size=8, dropout=0.5)
    _randomize(layer)
    h = torch.randn(6, 32)
    eval_out = layer.eval()(h)
    expected = bottleneck_adapter_ref(h, layer.adapter_down.weight, layer.adapter_down.bias, layer.adapter_up.weight,
                                      layer.adapter_up.bias)
    assert_close(eval_out.detach(), expected.detach(), torch.float32, "eval output")
    layer.train()
    first, second = layer(h), layer(h)
    assert not torch.allclose(first, eval_out) and not torch.allclose(first, second)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"hidden_size": 0}, ValueError, "hidden_size"),
    ({"hidden_size": 8.0}, TypeError, "hidden_size"),
    ({"bottleneck_size": True}, TypeError, "bottleneck_size"),
    ({"reduction_factor": 0}, ValueError, "reduction_factor"),
    ({"non_linearity": "tanh"}, ValueError, "activation 'tanh'"),
    ({"scaling": "channel"}, ValueError, "channel"),
    ({"scaling": float("nan")}, ValueError, "scaling"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"init": "xavier"}, ValueError, "init"),
])
def test_bad_arguments_raise_clearly(kwargs, error, match):
    args = {"hidden_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        fastpeft.BottleneckAdapter(**args)
