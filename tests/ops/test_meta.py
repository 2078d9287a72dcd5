"""fastpeft's ops and layers on meta tensors: shape propagation, as ``F.linear`` does.

Each op is called on meta copies of a CPU problem (2-D and 3-D inputs, bias, dropout in
training, fp32 adapters on a bf16 base, a learned scaling, a mixed batch with ``-1`` ids):
its output and every gradient must be meta tensors with the shapes and dtypes the same call
on the CPU tensors gives. Meta tensors hold no values, so the ops answer them with their
registered fake implementations (``op_calls.eager_plain``), and ``torch.autocast``, which has
no meta device type, leaves them uncast, as it leaves ``F.linear``."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpeft
from fastpeft.ops import bottleneck_adapter, lora_linear, multi_lora_linear

META = torch.device("meta")
K, N, R, SLOTS = 12, 10, 4, 3
LEADS = [(5,), (2, 3)]  # 2-D and 3-D inputs
DTYPES = [torch.float32, torch.bfloat16]


class Case(NamedTuple):
    """One op call: ``call(**tensors)`` with CPU ``tensors``; ``grad_names`` the floating ones
    the op is differentiable in."""

    call: Callable[..., torch.Tensor]
    tensors: dict[str, torch.Tensor | None]
    grad_names: tuple[str, ...]


def _lora(lead: tuple[int, ...], dtype: torch.dtype) -> Case:
    tensors = dict(x=torch.randn(*lead, K, dtype=dtype), weight=torch.randn(N, K, dtype=dtype),
                   bias=torch.randn(N, dtype=dtype), lora_a=torch.randn(R, K), lora_b=torch.randn(N, R))

    def call(x, weight, bias, lora_a, lora_b):
        return lora_linear(x, weight, bias, lora_a, lora_b, 2.0, dropout_p=0.1, training=True)

    return Case(call, tensors, ("x", "weight", "bias", "lora_a", "lora_b"))


def _bottleneck(lead: tuple[int, ...], dtype: torch.dtype) -> Case:
    tensors = dict(h=torch.randn(*lead, K, dtype=dtype), w_down=torch.randn(R, K), b_down=torch.randn(R),
                   w_up=torch.randn(K, R), b_up=torch.randn(K), scaling=torch.randn(1),
                   residual=torch.randn(*lead, K, dtype=dtype))

    def call(h, w_down, b_down, w_up, b_up, scaling, residual):
        return bottleneck_adapter(h, w_down, b_down, w_up, b_up, "gelu", scaling, residual, dropout_p=0.1,
                                  training=True)

    return Case(call, tensors, ("h", "w_down", "b_down", "w_up", "b_up", "scaling", "residual"))


def _multi_lora(lead: tuple[int, ...], dtype: torch.dtype) -> Case:
    tensors = dict(x=torch.randn(*lead, K, dtype=dtype), weight=torch.randn(N, K, dtype=dtype),
                   bias=torch.randn(N, dtype=dtype), lora_a=torch.randn(SLOTS, R, K),
                   lora_b=torch.randn(SLOTS, N, R), scalings=torch.rand(SLOTS),
                   adapter_ids=torch.randint(-1, SLOTS, lead), ranks=torch.tensor([R, 1, 0]))
    return Case(multi_lora_linear, tensors, ("x", "weight", "bias", "lora_a", "lora_b"))


OPS = {"lora_linear": _lora, "bottleneck_adapter": _bottleneck, "multi_lora_linear": _multi_lora}


def _inputs(case: Case, device: torch.device, requires_grad: bool) -> dict[str, torch.Tensor | None]:
    """The case's tensors on ``device``, the differentiable ones requiring grad if asked."""
    return {name: None if t is None else t.detach().to(device).requires_grad_(requires_grad and name in case.grad_names)
            for name, t in case.tensors.items()}


def _run(case: Case, device: torch.device, requires_grad: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output on ``device`` and, with ``requires_grad``, the gradient of every
    differentiable input (for a gradient of ones)."""
    inputs = _inputs(case, device, requires_grad)
    out = case.call(**inputs)
    if not requires_grad:
        return out, {}
    leaves = [inputs[name] for name in case.grad_names]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out, dict(zip(case.grad_names, grads))


def _assert_meta_like(meta: torch.Tensor, cpu: torch.Tensor, what: str) -> None:
    assert meta.device == META, f"{what}: on {meta.device}, expected meta"
    assert (meta.shape, meta.dtype) == (cpu.shape, cpu.dtype), (
        f"{what}: meta gives {tuple(meta.shape)} {meta.dtype}, the CPU call {tuple(cpu.shape)} {cpu.dtype}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_op_on_meta_matches_cpu_shapes(op, lead, dtype, requires_grad):
    """Output and gradients on meta tensors: meta, with the CPU call's shapes and dtypes."""
    case = OPS[op](lead, dtype)
    cpu_out, cpu_grads = _run(case, torch.device("cpu"), requires_grad)
    meta_out, meta_grads = _run(case, META, requires_grad)
    _assert_meta_like(meta_out, cpu_out, "output")
    assert meta_out.requires_grad == cpu_out.requires_grad == requires_grad
    assert meta_grads.keys() == cpu_grads.keys()
    for name, grad in meta_grads.items():
        _assert_meta_like(grad, cpu_grads[name], f"gradient of {name}")


@pytest.mark.parametrize("op", OPS)
def test_op_on_meta_is_not_cast_by_autocast(op):
    """Under a CPU autocast region meta tensors keep their dtype, as with ``F.linear``
    (``torch.is_autocast_enabled("meta")`` itself raises)."""
    case = OPS[op]((2, 3), torch.float32)
    inputs = _inputs(case, META, requires_grad=False)
    first = next(iter(inputs.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.call(**inputs)
        linear = F.linear(first, torch.empty(N, K, device=META))
    assert out.dtype == linear.dtype == torch.float32


@pytest.mark.parametrize("op", ["lora_linear", "bottleneck_adapter"])
def test_double_backward_on_meta(op):
    """``create_graph=True`` on meta: the first gradients are differentiable again, and the
    second ones have the CPU call's shapes."""
    case = OPS[op]((2, 3), torch.float32)

    def second_grads(device):
        inputs = _inputs(case, device, requires_grad=True)
        out = case.call(**inputs)
        leaves = [inputs[name] for name in case.grad_names]
        first = torch.autograd.grad(out, leaves, torch.ones_like(out), create_graph=True)
        total = sum(g.float().pow(2).sum() for g in first if g.requires_grad)
        return torch.autograd.grad(total, leaves, allow_unused=True)

    for name, meta, cpu in zip(case.grad_names, second_grads(META), second_grads(torch.device("cpu"))):
        assert (meta is None) == (cpu is None), name
        if meta is not None:
            _assert_meta_like(meta, cpu, f"second gradient of {name}")


def test_multi_lora_double_backward_on_meta_says_why_not():
    """The multi-LoRA double backward groups tokens by the ids' values: on meta it refuses
    with a message saying so (its first backward works, above)."""
    case = _multi_lora((2, 3), torch.float32)
    inputs = _inputs(case, META, requires_grad=True)
    out = case.call(**inputs)
    with pytest.raises(NotImplementedError, match=r"double backward \(create_graph=True\).*meta tensors"):
        torch.autograd.grad(out, inputs["x"], torch.ones_like(out), create_graph=True)


def _lora_layer_in_meta_context() -> nn.Module:
    with torch.device("meta"):
        return fastpeft.LoRALinear(K, N, r=R, lora_dropout=0.1)


def _lora_layer_with_meta_device() -> nn.Module:
    return fastpeft.LoRALinear(K, N, r=R, lora_dropout=0.1, device="meta", dtype=torch.bfloat16)


def _bottleneck_layer_in_meta_context() -> nn.Module:
    with torch.device("meta"):
        return fastpeft.BottleneckAdapter(K, R, non_linearity="gelu", scaling="learned", dropout=0.1)


# Each layer: how it is built, the dtype of its input and its output features.
LAYERS = {
    "lora_in_meta_context": (_lora_layer_in_meta_context, torch.float32, N),
    "lora_bf16_on_meta_device": (_lora_layer_with_meta_device, torch.bfloat16, N),
    "bottleneck_in_meta_context": (_bottleneck_layer_in_meta_context, torch.float32, K),
}


@pytest.mark.parametrize("layer_name", LAYERS)
def test_layer_built_on_meta(layer_name):
    """A layer built on the meta device runs a training step's forward and backward there:
    the output has x's leading shape, every trainable parameter gets a gradient of its own
    shape and dtype, the frozen base none."""
    build, dtype, out_features = LAYERS[layer_name]
    layer = build().train()
    params = dict(layer.named_parameters())
    assert all(p.device == META for p in params.values())
    assert any(p.requires_grad for p in params.values())
    x = torch.empty(2, 3, K, device=META, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert (out.device, out.shape, out.dtype) == (META, (2, 3, out_features), dtype)
    out.sum().backward()
    assert (x.grad.device, x.grad.shape) == (META, x.shape)
    for name, p in params.items():
        if p.requires_grad:
            assert (p.grad.device, p.grad.shape, p.grad.dtype) == (META, p.shape, p.dtype), name
        else:
            assert p.grad is None, name


def test_multi_lora_layer_on_meta():
    """``MultiLoRALinear`` over a meta ``nn.Linear``: a mixed batch's output and x's gradient."""
    base = nn.Linear(K, N, device=META)
    layer = fastpeft.MultiLoRALinear(base, max_adapters=SLOTS, max_rank=R)
    x = torch.empty(2, 3, K, device=META, requires_grad=True)
    out = layer(x, torch.zeros(2, 3, dtype=torch.int64, device=META))
    assert (out.device, out.shape, out.dtype) == (META, (2, 3, N), torch.float32)
    out.sum().backward()
    assert (x.grad.device, x.grad.shape) == (META, x.shape)
