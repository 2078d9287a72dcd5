"""The fused bottleneck adapter op against a float64 reference: the output and every gradient
(h, W_down, b_down, W_up, b_up, a separate residual, a learned scaling) on every backend (Triton
kernels, interpreted on CPU, and the torch path), every activation, odd shapes, strided and
3-D inputs, dropout, M = 0."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from fastpeft.kernels.bottleneck.ref import ACTIVATIONS as ACCEPTED_NAMES
from fastpeft.kernels.bottleneck.ref import CANONICAL_ACTIVATIONS, canonical_activation
from fastpeft.ops import bottleneck_adapter, bottleneck_adapter_dropout_mask, bottleneck_adapter_ref
from tests.helpers.bottleneck_problem import REFERENCE_ACTIVATIONS, check_against_reference, leaf, make_problem
from tests.helpers.devices import BACKENDS, DEVICE
from tests.helpers.numerics import TOLERANCE, assert_close

ACTIVATIONS = ["relu", "gelu", "gelu_new", "silu", "linear"]
OP_MODULE = importlib.import_module("fastpeft.ops.bottleneck_adapter")
TORCH_PATH = importlib.import_module("fastpeft.ops.bottleneck_adapter_torch")
# Eager torch-path calls run one of two ways (``RECORDED_MAX_ELEMENTS``): small problems as
# torch ops that autograd records, larger ones through the op's own backward, where large
# problems' forward also forms its up-projection as one GEMM (``FUSED_UP_MIN_ELEMENTS``).
# Here "torch" records every size (plain up-projection) and "torch-op-backward" sends every
# size needing autograd to the op's backward, with the one-GEMM up-projection at every size,
# so each test checks both on its small shapes.
TORCH_OP_BACKWARD = "torch-op-backward"
# Points where the activations are pinned, and transformers' ACT2FN values there (transformers
# 5.25, float64), by function: a change in ACT2FN, in the torch path's table or name map
# (fastpeft.kernels.bottleneck.ref) or in the tests' reference formulas shows.
PIN_Z = [-3.0, -0.5, 0.0, 0.7, 2.5]
PINNED = {
    "relu": [0.0, 0.0, 0.0, 0.7, 2.5],
    "gelu": [-0.00404969409489031, -0.15426876936299344, 0.0, 0.5306254434438489, 2.4844758366855597],
    "gelu_tanh": [-0.0036373920817729943, -0.15428599017485606, 0.0, 0.5305701347051167, 2.484915733910001],
    "silu": [-0.14227761953270035, -0.1887703343990727, 0.0, 0.46773144051771626, 2.3103545499468914],
    "identity": PIN_Z,
}
# fastpeft's names that are no ACT2FN key, and the ACT2FN key of the same function.
ACT2FN_NAME = {"gelu_tanh": "gelu_pytorch_tanh", "identity": "linear"}


@pytest.fixture(params=[*BACKENDS, TORCH_OP_BACKWARD])
def backend(request, monkeypatch):
    """This module's backends (overriding conftest's): FASTPEFT_BACKEND, and for the torch path
    which of its two eager routes runs."""
    large_route = request.param == TORCH_OP_BACKWARD
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch" if large_route else request.param)
    monkeypatch.setattr(OP_MODULE, "RECORDED_MAX_ELEMENTS", -1 if large_route else sys.maxsize)
    monkeypatch.setattr(TORCH_PATH, "FUSED_UP_MIN_ELEMENTS", 0 if large_route else sys.maxsize)
    return "torch" if large_route else request.param


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(backend, activation):
    check_against_reference(make_problem((7,), 45, 8, torch.float32), activation)


# (leading dims, D, R): every bottleneck tile of the kernels (R 1..256), decode and
# multi-program M, 3-D h, D not a multiple of 16; above 64 ranks the backward's weight
# gradients are GEMMs in 128-rank blocks (200: a partial second block) and dh has its own
# kernel (130 rows: two of its 128-row tiles).
SHAPES = [((1,), 45, 1), ((130,), 45, 48), ((2, 9), 45, 64), ((7,), 21, 128), ((7,), 21, 256), ((130,), 33, 8),
          ((2, 65), 45, 200)]


@pytest.mark.parametrize("lead,d,r", SHAPES)
def test_shapes_fp16(backend, lead, d, r):
    check_against_reference(make_problem(lead, d, r, torch.float16), "silu")


@pytest.mark.parametrize("dtype,w_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
])
def test_dtypes(backend, dtype, w_dtype):
    """16-bit h with fp32 adapter weights: the branch runs in fp32 (gradients in fp32). bf16
    runs in the interpreter too: the kernels widen every load to fp32 before any arithmetic
    (the interpreter's bf16 loads and stores are right, its bf16 arithmetic is not)."""
    check_against_reference(make_problem((2, 9), 45, 16, dtype, w_dtype), "gelu_new")


def test_float64_runs_the_torch_path_on_every_backend(backend):
    check_against_reference(make_problem((7,), 45, 8, torch.float64), "relu")


@pytest.mark.parametrize("learned", [True, False])
def test_no_biases_and_a_separate_residual(backend, learned):
    pb = make_problem((2, 7), 45, 16, torch.float32, biases=False, residual=True)
    check_against_reference(pb, "relu", learned=learned)


def test_strided_inputs(backend):
    """h a transposed 2-D view and the weights transposed views; a zero-stride grad_out in
    the second call (one random row broadcast over the rows, like the gradient of a sum over
    rows: random, so that dW_up's rows differ)."""
    pb = make_problem((45,), 37, 8, torch.float32)
    pb.h = torch.randn(37, 45, device=DEVICE).t()
    pb.w_down = pb.w_down.t().contiguous().t()
    pb.w_up = pb.w_up.t().contiguous().t()
    assert not pb.h.is_contiguous() and not pb.w_down.is_contiguous()
    out = check_against_reference(pb, "gelu")
    check_against_reference(pb, "gelu", grad_out=torch.randn(1, out.shape[-1], device=DEVICE).expand(out.shape))


def test_strided_3d_view(backend):
    pb = make_problem((3, 10), 45, 8, torch.float16, residual=True)
    pb.h = torch.randn(3, 20, 45, device=DEVICE).half()[:, ::2]
    pb.residual = torch.randn(3, 10, 90, device=DEVICE).half()[..., ::2]
    check_against_reference(pb, "silu")


@pytest.mark.parametrize("dtype,r,d", [(torch.float32, 16, 45), (torch.float16, 16, 45), (torch.float32, 200, 130)])
def test_dropout_matches_the_exposed_mask(backend, dtype, r, d):
    """Dropout with h as the residual and with a separate one (fp16), and through the dh kernel
    of bottlenecks above 128 ranks (r = 200), whose tiles draw the mask on their own (D = 130:
    three column tiles, so the mask's column offset is exercised)."""
    check_against_reference(make_problem((2, 33), d, r, dtype, residual=dtype == torch.float16), "gelu", 0.3)


def test_dropout_is_reproducible_and_keeps_about_1_minus_p(backend):
    pb = make_problem((64,), 64, 8, torch.float32)

    def run() -> torch.Tensor:
        torch.manual_seed(7)
        return bottleneck_adapter(pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, "relu", 1.0, None, 0.25, training=True)

    first, second = run(), run()
    assert torch.equal(first, second)
    eval_out = bottleneck_adapter(pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, "relu", 1.0, None, 0.25)
    assert not torch.equal(first, eval_out)
    mask = bottleneck_adapter_dropout_mask(torch.tensor([99], device=DEVICE), 256, 512, 0.25)
    assert abs(mask.float().mean().item() - 0.75) < 0.01


def test_empty_batch(backend):
    pb = make_problem((0,), 45, 8, torch.float32)
    h, wd = pb.h.requires_grad_(), pb.w_down.requires_grad_()
    out = bottleneck_adapter(h, wd, pb.b_down, pb.w_up, pb.b_up, "gelu", 0.5)
    assert out.shape == (0, 45)
    out.sum().backward()
    assert h.grad.shape == (0, 45) and torch.equal(wd.grad, torch.zeros_like(wd))


@pytest.mark.parametrize("r", [16, 200])  # 200: the chunked column kernel and the dh kernel
def test_backward_is_bitwise_reproducible(backend, r):
    pb = make_problem((130,), 45, r, torch.float16)

    def grads() -> list[torch.Tensor]:
        leaves = [leaf(t) for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up)]
        out = bottleneck_adapter(*leaves, "silu", 0.5)
        out.backward(torch.ones_like(out))
        return [t.grad for t in leaves]

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


def test_only_the_weights_need_grad(backend):
    """Frozen h (the first adapter on a model's embeddings' output): no dh is formed."""
    pb = make_problem((7,), 45, 8, torch.float32)
    wu = leaf(pb.w_up)
    out = bottleneck_adapter(pb.h, pb.w_down, pb.b_down, wu, pb.b_up, "relu", 2.0)
    out.backward(torch.ones_like(out))
    ref_wu = leaf(pb.w_up.double())
    bottleneck_adapter_ref(pb.h.double(), pb.w_down.double(), pb.b_down.double(), ref_wu, pb.b_up.double(), "relu",
                           2.0).sum().backward()
    assert_close(wu.grad, ref_wu.grad, torch.float32, "dw_up")


def test_scaling_tensor_of_shape_1_gets_its_own_shape_back(backend):
    """AdapterHub's learned scaling is ``nn.Parameter(torch.ones(1))``: a shape-(1,) scaling,
    here of a random value under a random upstream gradient, gives float64's out and dscaling,
    the latter in its own shape."""
    pb = make_problem((5,), 45, 8, torch.float32)
    scaling = torch.randn(1, device=DEVICE).requires_grad_()
    out = bottleneck_adapter(pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, "relu", scaling)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    inputs64 = [t.double() for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up)]
    scaling64 = scaling.detach().double().requires_grad_()
    out64 = bottleneck_adapter_ref(*inputs64, REFERENCE_ACTIVATIONS["relu"], scaling64)
    out64.backward(grad_out.double())
    assert_close(out, out64, torch.float32, "out")
    assert scaling.grad.shape == (1,) and scaling.grad.dtype == torch.float32
    # dscaling = sum(grad_out * u): its rounding scales with sum |grad_out * u|, not its value.
    u64 = (out64 - inputs64[0]).detach() / scaling64.detach()
    err = (scaling.grad.double() - scaling64.grad).abs().item() / (grad_out.double() * u64).abs().sum().item()
    assert err <= TOLERANCE[torch.float32], f"dscaling: error {err:.3e} of sum|g u|"


def test_autocast_runs_in_the_autocast_dtype():
    pb = make_problem((7,), 45, 8, torch.float32)
    w = leaf(pb.w_down)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = bottleneck_adapter(pb.h, w, pb.b_down, pb.w_up, pb.b_up, "gelu", 0.5)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32


def test_small_eager_torch_path_calls_are_recorded_by_autograd_large_ones_use_the_op(monkeypatch):
    """The torch path's two eager routes switch at ``RECORDED_MAX_ELEMENTS`` elements of h
    (inclusive); calls needing no autograd return a plain tensor either way."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    pb = make_problem((7,), 45, 8, torch.float32)
    leaves = [leaf(t) for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up)]
    outs = {}
    for limit in (7 * 45, 7 * 45 - 1):
        monkeypatch.setattr(OP_MODULE, "RECORDED_MAX_ELEMENTS", limit)
        outs[limit] = bottleneck_adapter(*leaves, "gelu", 0.5)
        with torch.no_grad():
            assert bottleneck_adapter(*leaves, "gelu", 0.5).grad_fn is None
    assert "BottleneckAdapterFunction" not in type(outs[7 * 45].grad_fn).__name__
    assert type(outs[7 * 45 - 1].grad_fn).__name__ == "BottleneckAdapterFunctionBackward"
    torch.testing.assert_close(outs[7 * 45], outs[7 * 45 - 1], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ACCEPTED_NAMES))
def test_activations_are_transformers_act2fn(name):
    """Every accepted name, through the torch path's table and name map and through the tests'
    reference formulas, gives transformers' ACT2FN values at a few pinned points (gelu_fast
    folds its constants differently from gelu_new: equal up to rounding)."""
    act2fn = pytest.importorskip("transformers.activations").ACT2FN
    z = torch.tensor(PIN_Z, dtype=torch.float64)
    pinned = torch.tensor(PINNED[canonical_activation(name)], dtype=torch.float64)
    hf = act2fn[ACT2FN_NAME.get(name, name)](z)
    torch_path = CANONICAL_ACTIVATIONS[canonical_activation(name)](z)
    reference = REFERENCE_ACTIVATIONS[name](z)
    for what, values in (("transformers' ACT2FN", hf), ("the torch path", torch_path), ("the reference", reference)):
        torch.testing.assert_close(values, pinned, rtol=1e-12, atol=1e-12, msg=lambda m, w=what: f"{name}, {w}: {m}")
    assert set(REFERENCE_ACTIVATIONS) == set(ACCEPTED_NAMES)
