"""``fastpeft tune``'s validation of the bottleneck adapter (fastpeft.tune.bottleneck) and of
multi-LoRA (fastpeft.tune.multi_lora) in Triton's interpreter: every implementation passes on
the odd shapes, and each check fails when what it guards breaks -- one wrong element that the
norm hides, other dropout bits, two runs that differ, the op running another path."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.bottleneck import launch as bottleneck_launch
from fastpeft.kernels.multi_lora import launch as multi_lora_launch
from fastpeft.kernels.tuned_table import INFERENCE, TRAINING, TRAINING_DROPOUT
from fastpeft.tune import bottleneck, multi_lora
from fastpeft.tune.checks import Problem
from fastpeft.tune.shapes import Grid
from tests.helpers.devices import KERNELS_RUN

pytestmark = pytest.mark.skipif(not KERNELS_RUN, reason="needs the Triton kernels (a GPU or the interpreter)")

CPU = torch.device("cpu")
GRID = Grid(layers=(), hidden=64, decode_ms=(1,), train_ms=(33,), ranks=(8,), bottleneck_ranks=(8,),
            dtype=torch.bfloat16, adapter_dtype=torch.float32, dropout_p=0.05, tiny=True)


def _bottleneck(dropout_p: float = 0.0, m: int = 21) -> Problem:
    # D = 48 and R = 20: partial tiles; bf16 h with fp32 adapter weights
    return Problem("bottleneck", TRAINING_DROPOUT if dropout_p else TRAINING, m, 48, 48, 20, torch.bfloat16,
                   torch.float32, dropout_p, "gelu")


def _multi_lora(m: int = 21) -> Problem:
    return Problem("multi_lora", INFERENCE, m, 48, 80, 12, torch.bfloat16, torch.float32)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tuner", [bottleneck, multi_lora], ids=["bottleneck", "multi_lora"])
def test_every_implementation_passes_the_odd_shapes(tuner):
    for problem in tuner.odd_problems(GRID):
        for implementation in tuner.implementations(CPU):
            v = tuner.validate(implementation, problem, CPU, _generator(1))
            assert v.passed, (implementation, problem, v.problems)
            assert 0 < v.max_rel_error < 0.05  # bf16 outputs: a few units of 2^-8 per row


def _one_element_off(forward, pick):
    """``forward`` with one element of its output moved by half its row's largest."""
    def wrong(*args, **kwargs):
        result = forward(*args, **kwargs)
        y = pick(result, args)
        y[7, 3] += 0.5 * y[7].abs().max()
        return result

    return wrong


def test_bottleneck_one_wrong_element_fails(monkeypatch):
    monkeypatch.setattr(bottleneck_launch, "bottleneck_forward",
                        _one_element_off(bottleneck_launch.bottleneck_forward, lambda result, args: result[0]))
    v = bottleneck.validate("triton", _bottleneck(m=256), CPU, _generator(2))
    assert not v.passed and [p.split(":")[0] for p in v.problems] == ["out"], v.problems
    assert "magnitude bound" in v.problems[0] and v.max_rel_error >= 0.2


def test_multi_lora_one_wrong_element_fails(monkeypatch):
    """At 256 tokens (the segment kernels, which add into y, their first argument, in place)
    the norm hides one element off by half its row's largest; the element bound does not."""
    monkeypatch.setattr(multi_lora_launch, "multi_lora_segments_add",
                        _one_element_off(multi_lora_launch.multi_lora_segments_add, lambda result, args: args[0]))
    v = multi_lora.validate("triton", _multi_lora(m=256), CPU, _generator(3))
    assert not v.passed and [p.split(":")[0] for p in v.problems] == ["y"], v.problems
    assert "magnitude bound" in v.problems[0]


def test_bottleneck_other_dropout_bits_fail(monkeypatch):
    """The reference's Philox mask with four bits flipped: the kernel's own bits then differ
    from it, as a kernel drawing other bits would."""
    draw = bottleneck.keep_mask_philox

    def flipped(*args):
        mask = draw(*args).clone()
        mask[0, :4] = ~mask[0, :4]
        return mask

    monkeypatch.setattr(bottleneck, "keep_mask_philox", flipped)
    v = bottleneck.validate("triton", _bottleneck(0.1), CPU, _generator(4))
    assert not v.passed and any("magnitude bound" in p for p in v.problems), v.problems


@pytest.mark.parametrize("which", ["bottleneck", "multi_lora"])
def test_runs_that_differ_fail(which, monkeypatch):
    calls = []
    if which == "bottleneck":
        forward = bottleneck_launch.bottleneck_forward

        def drifting(*args, **kwargs):
            out, z = forward(*args, **kwargs)
            calls.append(1)
            return out + (len(calls) - 1) * 1e-3 * out.abs().max(), z

        monkeypatch.setattr(bottleneck_launch, "bottleneck_forward", drifting)
        v = bottleneck.validate("triton", _bottleneck(), CPU, _generator(5))
    else:
        add = multi_lora_launch.multi_lora_decode

        def drifting(y, *args, **kwargs):
            add(y, *args, **kwargs)
            calls.append(1)
            y.add_((len(calls) - 1) * 1e-3 * y.abs().max())

        monkeypatch.setattr(multi_lora_launch, "multi_lora_decode", drifting)
        v = multi_lora.validate("triton", _multi_lora(m=16), CPU, _generator(5))
    assert not v.passed and any("not bitwise reproducible" in p for p in v.problems), v.problems


@pytest.mark.parametrize("tuner,problem", [(bottleneck, _bottleneck()), (multi_lora, _multi_lora())],
                         ids=["bottleneck", "multi_lora"])
def test_the_op_running_another_path_fails(tuner, problem, monkeypatch):
    monkeypatch.setattr(tuner, "op_implementation", lambda *args: "torch")
    v = tuner.validate("triton", problem, CPU, _generator(6))
    assert not v.passed and v.problems == ("the op runs torch for this problem, not triton",)


def test_the_cases_cover_every_mode_and_width():
    assert {(p.mode, p.m, p.r, p.dropout_p) for p in bottleneck.cases(GRID)} == {
        (TRAINING, 33, 8, 0.0), (TRAINING_DROPOUT, 33, 8, 0.05), (INFERENCE, 1, 8, 0.0), (INFERENCE, 33, 8, 0.0)}
    assert all(p.k == p.n == 64 and p.activation == "relu" for p in bottleneck.cases(GRID))
    assert not multi_lora.cases(GRID)  # no layers in GRID: multi-LoRA times the model's layers
    assert not multi_lora.runs_here("cuda", _multi_lora(m=33)) and multi_lora.runs_here("cuda", _multi_lora(m=32))
