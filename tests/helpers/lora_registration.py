"""The LoRA op's torch.library registration checks, on whichever backend the caller forces
(``FASTPEFT_BACKEND``): opcheck of the forward and backward ops (schema, fake tensors,
autograd, AOT dispatch) and torch.compile(fullgraph=True) through forward and backward.
Shared by the fused kernels' / torch path's tests and the cuBLAS-hybrid path's."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor_config

import fastpeft
from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops import lora_linear
from tests.helpers.devices import DEVICE
from tests.helpers.lora_problem import SCALING, make_problem


def opcheck_forward(dropout_p: float, dtype: torch.dtype) -> None:
    """``torch.library.opcheck`` of ``fastpeft::lora_linear`` on a small problem."""
    pb = make_problem((3, 5), 40, 24, 4, dtype, lora_dtype=torch.float32)
    pb.x.requires_grad_()
    pb.lora_a.requires_grad_()
    pb.lora_b.requires_grad_()
    seed = draw_seed(DEVICE)
    torch.library.opcheck(
        torch.ops.fastpeft.lora_linear.default,
        (pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, dropout_p, seed),
    )


def opcheck_backward(needs: tuple[bool, bool, bool]) -> None:
    """``torch.library.opcheck`` of ``fastpeft::lora_linear_backward`` asked for the ``needs`` gradients."""
    pb = make_problem((7,), 40, 24, 4, torch.float32)
    s = torch.randn(7, 4, device=DEVICE)
    grad_y = torch.randn(7, 24, device=DEVICE)
    seed = draw_seed(DEVICE)
    # The mask the op's forward would have handed over: the torch path's, or none after the kernels.
    _, _, keep = torch.ops.fastpeft.lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, 0.1, seed)
    torch.library.opcheck(
        torch.ops.fastpeft.lora_linear_backward.default,
        (grad_y, pb.x, pb.weight, pb.lora_a, pb.lora_b, s, keep, SCALING, 0.1, seed, *needs),
    )


def compiled_matches_eager(dropout_p: float) -> None:
    """Compiled and eager agree exactly in what they compute, dropout included: with
    ``fallback_random`` Inductor draws the seed from the same generator stream as eager."""
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        _compare_compiled_with_eager(dropout_p)


def _compare_compiled_with_eager(dropout_p: float) -> None:
    layer = fastpeft.LoRALinear(40, 24, r=4, lora_alpha=8, lora_dropout=dropout_p, device=DEVICE)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)

    torch.manual_seed(0)
    y_compiled = compiled(x)
    y_compiled.square().sum().backward()
    grads_compiled = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None

    torch.manual_seed(0)
    y_eager = layer(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y_compiled, y_eager)
    for got, t in zip(grads_compiled, (x, layer.lora_A.weight, layer.lora_B.weight)):
        torch.testing.assert_close(got, t.grad)


def functional_op_compiles_without_graph_breaks() -> None:
    """``torch._dynamo.explain`` of a function calling ``lora_linear`` finds no graph break."""
    torch._dynamo.reset()
    pb = make_problem((6,), 40, 24, 4, torch.float32)
    a = pb.lora_a.requires_grad_()

    def f(x, a):
        return lora_linear(x, pb.weight, pb.bias, a, pb.lora_b, SCALING, 0.1, training=True).sum()

    explanation = torch._dynamo.explain(f)(pb.x, a)
    assert explanation.graph_break_count == 0, explanation.break_reasons
