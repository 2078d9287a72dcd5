"""The bottleneck adapter op's registration and its argument checks: opcheck (schema, fake
tensors, autograd, AOT dispatch), torch.compile(fullgraph=True) through forward and backward,
gradcheck in float64, double backward, and clear errors for bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch._inductor.config as inductor_config

from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops import bottleneck_adapter, bottleneck_adapter_dropout_mask, bottleneck_adapter_ref
from tests.helpers.bottleneck_problem import make_problem
from tests.helpers.devices import DEVICE


@pytest.mark.parametrize("dropout_p,learned", [(0.0, True), (0.2, False)])
def test_opcheck_forward(backend, dropout_p, learned):
    pb = make_problem((3, 5), 40, 8, torch.float16, w_dtype=torch.float32)
    for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up):
        t.requires_grad_()
    scaling_t = torch.tensor(0.5, device=DEVICE, requires_grad=True) if learned else None
    torch.library.opcheck(
        torch.ops.fastpeft.bottleneck_adapter.default,
        (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, None, "gelu", 0.5, scaling_t, dropout_p, draw_seed(DEVICE),
         backend, True),
    )


@pytest.mark.parametrize("needs", [(True,) * 6, (False, True, False, True, False, False)])
def test_opcheck_backward(backend, needs):
    pb = make_problem((7,), 40, 8, torch.float32)
    seed = draw_seed(DEVICE)
    scaling_t = torch.tensor(0.5, device=DEVICE)
    _, z, keep = torch.ops.fastpeft.bottleneck_adapter(pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, None, "silu",
                                                       0.5, scaling_t, 0.1, seed, backend, True)
    torch.library.opcheck(
        torch.ops.fastpeft.bottleneck_adapter_backward.default,
        (torch.randn_like(pb.h), pb.h, pb.w_down, pb.w_up, pb.b_up, z, keep, "silu", 0.5, scaling_t, 0.1, seed,
         backend, True, *needs),
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_torch_compile_fullgraph_forward_and_backward(backend, dropout_p):
    """Compiled and eager agree, dropout included (``fallback_random``: the seed comes from
    the same generator stream as in eager)."""
    torch._dynamo.reset()
    pb = make_problem((2, 5), 40, 8, torch.float32)
    leaves = [t.requires_grad_() for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up)]
    scaling = torch.tensor(0.5, device=DEVICE, requires_grad=True)

    def f(h, wd, bd, wu, bu, s):
        return bottleneck_adapter(h, wd, bd, wu, bu, "gelu_new", s, None, dropout_p, training=True).square().sum()

    results = []
    with inductor_config.patch(fallback_random=True):
        for fn in (torch.compile(f, fullgraph=True), f):
            torch.manual_seed(0)
            loss = fn(*leaves, scaling)
            loss.backward()
            results.append([loss.detach()] + [t.grad.clone() for t in (*leaves, scaling)])
            for t in (*leaves, scaling):
                t.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


# The torch path's two eager routes (``RECORDED_MAX_ELEMENTS``): small calls recorded by
# autograd (its own double backward), larger ones through the op's backward, whose
# ``create_graph=True`` branch (``_differentiable_backward``) these tests must reach too.
EAGER_ROUTES = {"recorded": None, "op-backward": -1}


@pytest.fixture(params=list(EAGER_ROUTES))
def eager_route(request, monkeypatch):
    limit = EAGER_ROUTES[request.param]
    if limit is not None:
        monkeypatch.setattr(importlib.import_module("fastpeft.ops.bottleneck_adapter"), "RECORDED_MAX_ELEMENTS",
                            limit)
    return request.param


def test_gradcheck_float64(eager_route):
    pb = make_problem((3, 2), 9, 3, torch.float64, residual=True)
    scaling = torch.tensor(0.7, dtype=torch.float64, device=DEVICE)
    inputs = [t.requires_grad_() for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, pb.residual, scaling)]

    def f(h, wd, bd, wu, bu, res, s):
        return bottleneck_adapter(h, wd, bd, wu, bu, "silu", s, res)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_double_backward_matches_the_reference(backend, eager_route, dropout_p):
    """``create_graph=True`` (a gradient penalty) differentiates the backward itself, with the
    forward's dropout mask (the reference gets the op's mask for the same seed)."""
    pb = make_problem((5,), 12, 4, torch.float64)
    h64 = pb.h.requires_grad_()
    wd = pb.w_down.requires_grad_()
    torch.manual_seed(5)
    seed = draw_seed(DEVICE)  # what the op draws after the same manual_seed
    # float64 runs the torch path on every backend, so its mask is the torch path's.
    mask = bottleneck_adapter_dropout_mask(seed, 5, 12, dropout_p, backend="torch") if dropout_p else None
    calls = (
        lambda: bottleneck_adapter(h64, wd, pb.b_down, pb.w_up, pb.b_up, "gelu", 0.5, None, dropout_p, training=True),
        lambda: bottleneck_adapter_ref(h64, wd, pb.b_down, pb.w_up, pb.b_up, "gelu", 0.5, None, dropout_p,
                                       dropout_mask=mask),
    )
    results = []
    for call in calls:
        torch.manual_seed(5)
        out = call()
        (g,) = torch.autograd.grad(out.square().sum(), h64, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), wd)[0])
    torch.testing.assert_close(*results)


def _good() -> dict:
    pb = make_problem((4,), 16, 4, torch.float32)
    return {"h": pb.h, "w_down": pb.w_down, "b_down": pb.b_down, "w_up": pb.w_up, "b_up": pb.b_up}


BAD_INPUTS = [
    ({"h": "not a tensor"}, TypeError, "h must be a torch.Tensor"),
    ({"h": torch.ones(4, 16, dtype=torch.int32)}, TypeError, r"h \(shape \(4, 16\), dtype torch.int32"),
    ({"h": torch.randn(4, 15)}, ValueError, "last dimension must equal w_down's input size 16"),
    ({"w_down": torch.randn(4, 16, 1)}, ValueError, "w_down .* must be 2-D"),
    ({"w_down": torch.randn(0, 16), "w_up": torch.randn(16, 0)}, ValueError, "bottleneck size 0"),
    ({"w_up": torch.randn(16, 5)}, ValueError, r"w_up .* must have shape \(16, 4\)"),
    ({"w_up": torch.randn(16, 4, dtype=torch.float64)}, TypeError, "w_up dtype torch.float64 must match"),
    ({"h": torch.randn(4, 16, dtype=torch.float16), "w_down": torch.randn(4, 16, dtype=torch.bfloat16),
      "w_up": torch.randn(16, 4, dtype=torch.bfloat16), "b_down": None, "b_up": None},
     TypeError, "adapter weights dtype torch.bfloat16 must match h dtype torch.float16"),
    ({"b_down": torch.randn(5)}, ValueError, r"b_down .* must have shape \(4,\)"),
    ({"b_up": torch.randn(16, dtype=torch.float16)}, TypeError, "b_up dtype torch.float16 must match"),
    ({"activation": "tanhh"}, ValueError, "unknown activation 'tanhh'; expected one of"),
    ({"scaling": float("nan")}, ValueError, "scaling must be finite"),
    ({"scaling": torch.ones(2)}, ValueError, "scaling tensor .* must be a floating 0-d or 1-element tensor"),
    ({"residual": torch.randn(4, 8)}, ValueError, "residual .* must have h's shape and dtype"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ({"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ({"backend": "cublas"}, ValueError, "backend='cublas': expected None or one of"),
]


@pytest.mark.parametrize("change,error,match", BAD_INPUTS)
def test_bad_input_raises_clearly(change, error, match):
    args = {**_good(), "activation": "relu", "scaling": 1.0, "residual": None, "dropout_p": 0.0, **change}
    with pytest.raises(error, match=match):
        bottleneck_adapter(**args)


def test_activation_names_are_adapterhubs_case_insensitive():
    g = _good()
    aliases = (("swish", "silu"), ("SiLU", "silu"), ("gelu_pytorch_tanh", "gelu_new"), ("identity", "linear"),
               ("ReLU", "relu"))
    for name, same_as in aliases:
        torch.testing.assert_close(bottleneck_adapter(**g, activation=name),
                                   bottleneck_adapter(**g, activation=same_as))


def test_cuda_backend_on_cpu_tensors_runs_what_auto_runs():
    g = _good()
    torch.testing.assert_close(bottleneck_adapter(**g, backend="cuda"), bottleneck_adapter(**g, backend="auto"))
