"""``torch.autocast``: the LoRA op follows ``F.linear``'s casting rules, as PEFT's layer does,
eagerly and compiled, on both backends; whole models match PEFT under autocast (logits,
loss, LoRA gradients), and fp16 with a GradScaler unscales to PEFT's gradients.

Model-level comparisons measure both fastpeft and PEFT against the same model run in fp32
without autocast: fastpeft must be within the dtype's tolerance of PEFT and no less accurate
than PEFT by more than a small factor (both round to the autocast dtype in a different order)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops import lora_linear, lora_linear_dropout_mask, lora_linear_ref
from tests.helpers.dropout_replay import replayed_keep_mask
from tests.helpers.models import peft, tiny_gpt2, tiny_llama, token_ids
from tests.helpers.numerics import TOLERANCE, assert_close, relative_error
from tests.helpers.lora_problem import SCALING, make_problem

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
# fastpeft's error against fp32 may exceed PEFT's by this factor: both round every GEMM's
# inputs and output to the autocast dtype, in a different order, so on a given draw either
# can come out ahead; 2x is far below what a wrong cast (fp32 kept, or a branch dropped) gives.
PEFT_ERROR_FACTOR = 2.0


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_op_casts_like_f_linear(backend, dtype, dropout_p):
    """fp32 x, base weight and LoRA weights under autocast: the output has ``F.linear``'s
    dtype, equals float64 PEFT math on the cast inputs, and every gradient comes back in
    its input's dtype (fp32), equal to the float64 gradients."""
    pb = make_problem((3, 5), 40, 24, 4, torch.float32)
    x, a, b = (t.requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b))
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=dtype):
        y = lora_linear(x, pb.weight, pb.bias, a, b, SCALING, dropout_p, training=True)
        assert y.dtype == F.linear(x, pb.weight, pb.bias).dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == torch.float32

    torch.manual_seed(3)
    mask = None
    if dropout_p:
        mask = replayed_keep_mask(draw_seed(x.device), 15, 40, dropout_p, lora_linear_dropout_mask).reshape(x.shape)
    cast = [t.detach().to(dtype).double().requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b)]
    w64, bias64 = pb.weight.to(dtype).double(), pb.bias.to(dtype).double()
    y64 = lora_linear_ref(cast[0], w64, bias64, cast[1], cast[2], SCALING, dropout_p, dropout_mask=mask)
    y64.backward(g.double())
    assert_close(y, y64, dtype, "y")
    for got, want, what in zip((x.grad, a.grad, b.grad), (t.grad for t in cast), ("dx", "dA", "dB")):
        assert_close(got, want, dtype, what)


def test_float64_is_not_cast(backend):
    """Autocast leaves float64 tensors alone, so an all-float64 call stays float64."""
    pb = make_problem((4,), 16, 8, 2, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING).dtype == torch.float64


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_op_compiled_under_autocast_matches_eager(backend, dtype):
    pb = make_problem((6,), 32, 20, 4, torch.float32)

    def run(fn):
        x, a, b = (t.detach().clone().requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b))
        with torch.autocast("cpu", dtype=dtype):
            y = fn(x, a, b)
        y.float().pow(2).sum().backward()
        return y, x.grad, a.grad, b.grad

    def op(x, a, b):
        return lora_linear(x, pb.weight, pb.bias, a, b, SCALING)

    eager = run(op)
    compiled = run(torch.compile(op, fullgraph=True, dynamic=False))
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype
        assert relative_error(got, want) <= TOLERANCE[dtype]


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_fc", "c_proj"]}


def _twins(name: str):
    """A PEFT model and a fastpeft model with the same random adapter (B non-zero)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = dict(r=8, lora_alpha=16, target_modules=TARGETS[name], init_lora_weights=False)
        theirs = peft.get_peft_model(MODELS[name](), peft.LoraConfig(**config))
        ours = fastpeft.from_peft(copy.deepcopy(theirs))
    return theirs, ours


def _lora_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for name, p in sorted(model.named_parameters()) if "lora_" in name])


def _step(model, ids, dtype: torch.dtype | None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits, out.loss, _lora_grads(model)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_models_match_peft_under_autocast(backend, name, dtype):
    theirs, ours = _twins(name)
    ids = token_ids()
    exact = _step(theirs, ids, None)
    peft_run = _step(theirs, ids, dtype)
    our_run = _step(ours, ids, dtype)
    assert our_run[0].dtype == peft_run[0].dtype
    for ours_t, peft_t, exact_t, what in zip(our_run, peft_run, exact, ("logits", "loss", "LoRA grads")):
        assert relative_error(ours_t, peft_t) <= 2 * TOLERANCE[dtype], what
        our_err, peft_err = relative_error(ours_t, exact_t), relative_error(peft_t, exact_t)
        assert our_err <= max(PEFT_ERROR_FACTOR * peft_err, TOLERANCE[dtype] / 10), (what, our_err, peft_err)


def test_fp16_grad_scaler_unscales_to_peft_gradients(backend):
    """fp16 autocast with a GradScaler: the scaled gradients, unscaled by the optimizer's
    ``unscale_``, equal PEFT's (within fp16's tolerance) and are finite."""
    theirs, ours = _twins("llama")
    ids = token_ids()
    grads = []
    for model in (theirs, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads.append(_lora_grads(model))
    assert torch.isfinite(grads[1]).all()
    assert relative_error(grads[1], grads[0]) <= 2 * TOLERANCE[torch.float16]
