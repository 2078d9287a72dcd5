"""The op's torch.library registration: opcheck (schema, fake tensors, autograd, AOT
dispatch) and torch.compile(fullgraph=True) through forward and backward (the checks, which
the hybrid path's tests run too, are in ``tests/helpers/lora_registration.py``), and the
eager calls that skip the dispatcher."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops import lora_linear
from tests.helpers.devices import DEVICE
from tests.helpers.lora_problem import SCALING, make_problem
from tests.helpers.lora_registration import (
    compiled_matches_eager,
    functional_op_compiles_without_graph_breaks,
    opcheck_backward,
    opcheck_forward,
)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_forward(backend, dropout_p, dtype):
    opcheck_forward(dropout_p, dtype)


@pytest.mark.parametrize("needs", [(True, True, True), (False, False, True), (True, False, False)])
def test_opcheck_backward(backend, needs):
    opcheck_backward(needs)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_torch_compile_fullgraph_forward_and_backward(backend, dropout_p):
    compiled_matches_eager(dropout_p)


def test_functional_op_compiles_without_graph_breaks(backend):
    functional_op_compiles_without_graph_breaks()


def test_eager_inference_skips_the_dispatcher_only_when_nothing_needs_it():
    from fastpeft.ops.op_calls import call_directly

    pb = make_problem((3,), 16, 8, 2, torch.float32)
    plain = (pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b)
    assert call_directly(*plain)
    a = pb.lora_a.clone().requires_grad_()
    assert not call_directly(pb.x, pb.weight, pb.bias, a, pb.lora_b)
    with torch.no_grad():
        assert call_directly(pb.x, pb.weight, pb.bias, a, pb.lora_b)
        y_direct = lora_linear(*plain, SCALING)
    assert not call_directly(pb.x.as_subclass(_Sub), pb.weight, None, pb.lora_a, pb.lora_b)
    y_op, _, _ = torch.ops.fastpeft.lora_linear(*plain, SCALING, 0.0, pb.x.new_empty(0, dtype=torch.int64))
    torch.testing.assert_close(y_direct, y_op, rtol=0, atol=0)


class _Sub(torch.Tensor):
    """A tensor subclass: the direct call must leave it to the dispatcher."""


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_training_path_matches_the_custom_op_exactly(backend, dropout_p):
    """Eager training calls on plain tensors run the op's functions through an
    ``autograd.Function`` (``_LoRALinearFunction``) instead of the custom op's dispatch: the
    output and every gradient must be bitwise those of ``torch.ops.fastpeft.lora_linear``
    for the same seed, and a second-order gradient must still flow."""
    from fastpeft.ops.lora_linear import _LoRALinearFunction
    from fastpeft.ops.op_calls import eager_plain

    pb = make_problem((2, 5), 24, 16, 4, torch.float32)
    seed = draw_seed(DEVICE)
    grad_y = torch.randn(2, 5, 16, device=DEVICE)
    results = []
    for call in (_LoRALinearFunction.apply, torch.ops.fastpeft.lora_linear):
        leaves = [t.detach().clone().requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b)]
        x, a, b = leaves
        y, _, _ = call(x, pb.weight, pb.bias, a, b, SCALING, dropout_p, seed)
        y.backward(grad_y)
        results.append([y.detach(), *(t.grad for t in leaves)])
    for eager, op, what in zip(*results, ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(eager, op, rtol=0, atol=0, msg=what)
    assert eager_plain(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b)
    assert not eager_plain(pb.x.as_subclass(_Sub), pb.weight, None, pb.lora_a, pb.lora_b)

    # Double backward through the eager path (the backward is linear in grad_y and the LoRA weights).
    x = pb.x.detach().clone().requires_grad_()
    a = pb.lora_a.detach().clone().requires_grad_()
    y, _, _ = _LoRALinearFunction.apply(x, pb.weight, pb.bias, a, pb.lora_b, SCALING, dropout_p, seed)
    (dx,) = torch.autograd.grad(y, x, grad_y, create_graph=True)
    (da,) = torch.autograd.grad(dx.square().sum(), a)
    assert torch.isfinite(da).all() and da.abs().sum() > 0

