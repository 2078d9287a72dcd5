"""``fastpeft.ops.dora_linear`` (the torch path of the DoRA op) against float64 PEFT math.

The reference is PEFT's ``DoraLinearLayer`` formula written out in float64 with autograd:
``y = x W^T + b + (c - 1) * (x' W^T) + c * s * (x' A^T B^T)``, ``c = m / ||W + s B A||_row``
(detached), ``x' = dropout(x)``; the op's dropout mask is read back from its ``keep`` output.
Fresh random inputs each run; odd shapes, 3-D, non-contiguous and empty (M = 0) inputs; every
gradient (x, A, B, m); the low-rank row norm against the norm of the formed ``W + s B A``; the
registration (``opcheck``: schema, fake tensors, autograd) and the argument checks.
"""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops.dora_linear import dora_linear
from fastpeft.ops.dora_linear_torch import dora_row_norm
from tests.helpers.numerics import assert_close

# (M, K, N, r): odd sizes, r = 1, a rank above K, and M = 0.
SHAPES = [(7, 13, 11, 3), (1, 5, 9, 1), (33, 24, 17, 8), (4, 6, 5, 9), (0, 8, 6, 2)]
SCALING = 1.7


def inputs(m: int, k: int, n: int, r: int, dtype: torch.dtype, lora_dtype: torch.dtype | None = None,
           bias: bool = True) -> dict:
    """Fresh random tensors (B nonzero, m near the base norms, as after training)."""
    lora_dtype = lora_dtype or dtype
    weight = torch.randn(n, k, dtype=dtype)
    return dict(
        x=torch.randn(m, k, dtype=dtype),
        weight=weight,
        bias=torch.randn(n, dtype=dtype) if bias else None,
        lora_a=torch.randn(r, k, dtype=lora_dtype) / k ** 0.5,
        lora_b=torch.randn(n, r, dtype=lora_dtype) / r ** 0.5,
        magnitude=(weight.double().norm(dim=1) * (1 + 0.1 * torch.randn(n, dtype=torch.float64))).to(lora_dtype),
    )


def reference(t: dict, scaling: float, keep: torch.Tensor | None = None, p: float = 0.0) -> dict:
    """Output and gradients (of ``sum(y * probe)``) in float64 by PEFT's formula."""
    leaves = {k: v.detach().double().requires_grad_(k in ("x", "lora_a", "lora_b", "magnitude"))
              for k, v in t.items() if v is not None}
    x, w, a, b, m = (leaves[k] for k in ("x", "weight", "lora_a", "lora_b", "magnitude"))
    dropped = x * keep.double() / (1 - p) if keep is not None and keep.numel() else x
    norm = torch.linalg.norm(w + scaling * (b @ a), dim=1).detach()
    c = m / norm
    y = x @ w.t() + (c - 1) * (dropped @ w.t()) + c * scaling * (dropped @ a.t() @ b.t())
    if "bias" in leaves:
        y = y + leaves["bias"]
    probe = torch.randn_like(y)
    y.backward(probe)
    return {"y": y.detach(), "probe": probe,
            **{f"d{k}": leaves[k].grad for k in ("x", "lora_a", "lora_b", "magnitude")}}


def run_op(t: dict, scaling: float, p: float = 0.0, probe: torch.Tensor | None = None, **kwargs) -> dict:
    """The op's output (through the registered op when p > 0, to read its mask) and gradients."""
    leaves = {k: (v.detach().clone().requires_grad_(k in ("x", "lora_a", "lora_b", "magnitude"))
                  if v is not None else None) for k, v in t.items()}
    keep = None
    if p > 0.0:
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
        y, _, _, keep, _ = torch.ops.fastpeft.dora_linear(*leaves.values(), None, None, scaling, p, seed)
    else:
        y = dora_linear(*leaves.values(), scaling, **kwargs)
    out = {"y": y, "keep": keep}
    if probe is not None:
        y.backward(probe.to(y.dtype))
        out.update({f"d{k}": leaves[k].grad for k in ("x", "lora_a", "lora_b", "magnitude")})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_pefts_math(shape, dtype, bias):
    t = inputs(*shape, dtype, bias=bias)
    expected = reference(t, SCALING)
    got = run_op(t, SCALING, probe=expected["probe"])
    assert got["y"].dtype == dtype
    for key in ("y", "dx", "dlora_a", "dlora_b", "dmagnitude"):
        assert_close(got[key].double(), expected[key], dtype, key)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_dropout_with_the_ops_own_mask(shape):
    """With dropout the base runs on x and the DoRA terms on ``x'``; the mask the op drew
    (its ``keep`` output) rebuilds the same result in float64, gradients included."""
    t = inputs(*shape, torch.float32)
    p = 0.3
    probe = torch.randn(shape[0], shape[2])
    got = run_op(t, SCALING, p=p, probe=probe)
    assert got["keep"].shape == (shape[0], shape[1]) and got["keep"].dtype == torch.bool
    if shape[0] * shape[1] > 50:
        assert 0 < got["keep"].float().mean() < 1
    leaves = {k: v.detach().double().requires_grad_(k in ("x", "lora_a", "lora_b", "magnitude"))
              for k, v in t.items()}
    x, w, a, b, m = (leaves[k] for k in ("x", "weight", "lora_a", "lora_b", "magnitude"))
    dropped = x * got["keep"].double() / (1 - p)
    c = m / torch.linalg.norm(w + SCALING * (b @ a), dim=1).detach()
    y = x @ w.t() + leaves["bias"] + (c - 1) * (dropped @ w.t()) + c * SCALING * (dropped @ a.t() @ b.t())
    y.backward(probe.double())
    assert_close(got["y"].double(), y.detach(), torch.float32, "y")
    for key in ("x", "lora_a", "lora_b", "magnitude"):
        assert_close(got[f"d{key}"].double(), leaves[key].grad, torch.float32, f"d{key}")


def test_eval_mode_ignores_dropout():
    t = inputs(9, 10, 7, 2, torch.float32)
    expected = reference(t, SCALING)
    assert_close(dora_linear(*t.values(), SCALING, 0.5, training=False).double(), expected["y"], torch.float32, "y")


def test_3d_non_contiguous_inputs_and_fp32_adapter_on_bf16():
    """x ``[B, T, K]`` as a transposed view; bf16 base with fp32 adapter (PEFT's default)."""
    t = inputs(12, 16, 10, 4, torch.bfloat16, lora_dtype=torch.float32)
    x3 = t["x"].reshape(4, 3, 16).transpose(0, 1)
    assert not x3.is_contiguous()
    y = dora_linear(x3, *(t[k] for k in ("weight", "bias", "lora_a", "lora_b", "magnitude")), SCALING)
    assert y.shape == (3, 4, 10) and y.dtype == torch.bfloat16
    flat = {**t, "x": x3.reshape(12, 16)}
    assert_close(y.reshape(12, 10).double(), reference(flat, SCALING)["y"], torch.bfloat16, "y")


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_low_rank_row_norm_equals_the_formed_matrix_norm(shape):
    """``dora_row_norm`` never forms ``B A``; it equals the norm of ``W + s B A``, with or
    without the cached squared norms of W."""
    t = inputs(*shape, torch.float32)
    w, a, b = (t[k].double() for k in ("weight", "lora_a", "lora_b"))
    expected = torch.linalg.norm(w + SCALING * (b @ a), dim=1)
    for weight_sq in (None, (t["weight"].double() ** 2).sum(1)):
        got = dora_row_norm(t["weight"], t["lora_a"], t["lora_b"], SCALING, weight_sq)
        assert got.dtype == torch.float32
        assert_close(got.double(), expected, torch.float32, "row norm")
    assert_close(dora_row_norm(w, a, b, SCALING), expected, torch.float64, "row norm (float64)")


def test_cached_norms_are_used():
    """``weight_sq`` (W's squared row norms) and ``row_norm`` (the whole norm) given by the
    caller give the same output; a given ``row_norm`` is what the op divides by."""
    t = inputs(5, 8, 6, 2, torch.float32)
    expected = reference(t, SCALING)["y"]
    weight_sq = (t["weight"] ** 2).sum(1)
    norm = dora_row_norm(t["weight"], t["lora_a"], t["lora_b"], SCALING)
    assert_close(dora_linear(*t.values(), SCALING, weight_sq=weight_sq).double(), expected, torch.float32, "y")
    assert_close(dora_linear(*t.values(), SCALING, row_norm=norm).double(), expected, torch.float32, "y")
    halved = {**t, "bias": None, "magnitude": t["magnitude"] / 2}
    assert_close(dora_linear(*halved.values(), SCALING, row_norm=norm / 2).double(),
                 reference({**t, "bias": None}, SCALING)["y"], torch.float32, "y")


@pytest.mark.parametrize("cached_norm", [False, True], ids=["norm-computed", "norm-given"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(p, cached_norm):
    """Schema, fake tensors and autograd registration of both ops (``torch.library.opcheck``),
    with the row norm computed by the op or given (a cached one: the op's norm output is then a
    copy, never the input itself)."""
    t = {k: (v.requires_grad_(k in ("x", "lora_a", "lora_b", "magnitude")) if v is not None else v)
         for k, v in inputs(6, 7, 5, 2, torch.float32).items()}
    seed = torch.tensor([123], dtype=torch.int64) if p else torch.empty(0, dtype=torch.int64)
    norm = dora_row_norm(t["weight"], t["lora_a"].detach(), t["lora_b"].detach(), SCALING) if cached_norm else None
    torch.library.opcheck(torch.ops.fastpeft.dora_linear.default, (*t.values(), None, norm, SCALING, p, seed))


def test_backward_op_with_gradients_left_out():
    """The registered backward asked for dX and dm only: separate empty outputs for dA and dB
    (an op's outputs may not alias each other), checked by ``opcheck``."""
    t = inputs(5, 8, 6, 2, torch.float32)
    y, u, s, keep, norm = torch.ops.fastpeft.dora_linear(*t.values(), None, None, SCALING, 0.0,
                                                         torch.empty(0, dtype=torch.int64))
    args = (torch.randn_like(y), t["x"], t["weight"], t["lora_a"], t["lora_b"], t["magnitude"], u, s, keep, norm,
            SCALING, 0.0)
    dx, da, db, dm = torch.ops.fastpeft.dora_linear_backward(*args, True, False, False, True)
    assert da.numel() == db.numel() == 0 and dx.shape == t["x"].shape and dm.shape == t["magnitude"].shape
    torch.library.opcheck(torch.ops.fastpeft.dora_linear_backward.default, (*args, True, False, False, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_weight_gradient_when_the_base_trains(p):
    """W frozen is DoRA's rule, but a caller that trains it gets the gradient of PEFT's formula
    with the norm detached: ``(g c)^T x``, or with dropout ``g^T x + ((c - 1) g)^T x'``."""
    t = inputs(9, 10, 7, 3, torch.float64)
    probe = torch.randn(9, 7, dtype=torch.float64)
    weight = t["weight"].clone().requires_grad_()
    seed = torch.tensor([11], dtype=torch.int64) if p else torch.empty(0, dtype=torch.int64)
    y, _, _, keep, _ = torch.ops.fastpeft.dora_linear(t["x"], weight, t["bias"], t["lora_a"], t["lora_b"],
                                                       t["magnitude"], None, None, SCALING, p, seed)
    y.backward(probe)
    w = t["weight"].clone().requires_grad_()
    dropped = t["x"] * keep.double() / (1 - p) if keep.numel() else t["x"]
    c = t["magnitude"] / torch.linalg.norm(w + SCALING * t["lora_b"] @ t["lora_a"], dim=1).detach()
    expected = (t["x"] @ w.t() + t["bias"] + (c - 1) * (dropped @ w.t())
                + c * SCALING * (dropped @ t["lora_a"].t() @ t["lora_b"].t()))
    expected.backward(probe)
    assert_close(weight.grad, w.grad, torch.float64, "dW")


@pytest.mark.parametrize("field,value,error,match", [
    ("magnitude", torch.ones(4), ValueError, r"magnitude \(shape \(4,\).*must have shape \(6,\)"),
    ("magnitude", torch.ones(6, 1), ValueError, "magnitude .* must be 1-D"),
    ("magnitude", torch.ones(6, dtype=torch.int64), TypeError, "magnitude .* must be float32"),
    ("magnitude", None, TypeError, "magnitude must be a torch.Tensor, got NoneType"),
    ("lora_b", torch.ones(6, 3), ValueError, r"lora_b .* must have shape \(6, 2\)"),
])
def test_bad_arguments_name_themselves(field, value, error, match):
    t = {**inputs(3, 5, 6, 2, torch.float32), field: value}
    with pytest.raises(error, match=match):
        dora_linear(*t.values(), SCALING)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 48, 80, 8), (1, 16, 32, 4), (70, 64, 48, 16)], ids=str)
def test_kernels_with_doras_epilogue(monkeypatch, shape, dtype):
    """``FASTPEFT_BACKEND=triton`` (Triton's interpreter on CPU tensors here): the LoRA forward
    kernel with DoRA's epilogue (``HAS_SCALE``: the unscaled sum stored as ``u``, then the
    per-column scale, then the bias) and the LoRA backward kernels on ``g * c`` give PEFT's
    float64 output and every gradient; the kernels did run (recorded), their outputs poisoned
    before (``tests/conftest.py``). bf16: bf16 inputs and outputs, fp32 adapters (PEFT's
    default); the interpreter computes bf16 products in fp32, so its tolerance is bf16's."""
    pytest.importorskip("triton")
    import fastpeft.kernels.lora.launch as launch

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    calls = []
    for name in ("lora_forward", "lora_backward"):
        original = getattr(launch, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, kwargs.get("dora_scale") is not None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(launch, name, recorded)
    t = inputs(*shape, dtype, lora_dtype=torch.float32)
    expected = reference(t, SCALING)
    got = run_op(t, SCALING, probe=expected["probe"])
    assert ("lora_forward", True) in calls and ("lora_backward", False) in calls
    assert got["y"].dtype == dtype
    for key in ("y", "dx", "dlora_a", "dlora_b", "dmagnitude"):
        assert_close(got[key].double(), expected[key], dtype, key)
