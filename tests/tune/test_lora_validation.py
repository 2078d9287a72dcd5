"""``fastpeft tune``'s LoRA validation (fastpeft.tune.lora) in Triton's interpreter: every LoRA
implementation passes on odd shapes with and without dropout, and each check fails when what
it guards breaks -- one wrong element that the norm hides, other dropout bits from the mask
kernel, two runs that differ, the op running another path than the one asked for."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.lora import dispatch, launch as lora_launch
from fastpeft.kernels.tuned_table import TRAINING, TRAINING_DROPOUT
from fastpeft.tune.checks import Problem, checked
from fastpeft.tune.lora import LORA_SETTINGS, validate as validate_lora
from tests.helpers.devices import KERNELS_RUN

pytestmark = pytest.mark.skipif(not KERNELS_RUN, reason="needs the Triton kernels (a GPU or the interpreter)")

CPU = torch.device("cpu")


def _case(dropout_p: float = 0.0, m: int = 21) -> Problem:
    # partial tiles in every dimension; bf16 activations with PEFT's fp32 adapters
    return Problem("lora", TRAINING_DROPOUT if dropout_p else TRAINING, m, 48, 80, 8, torch.bfloat16, torch.float32,
                   dropout_p)


@pytest.mark.parametrize("implementation", sorted(LORA_SETTINGS))
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_every_implementation_passes(implementation, dropout_p):
    v = validate_lora(implementation, _case(dropout_p), CPU, torch.Generator().manual_seed(1))
    assert v.passed, v.problems
    assert 0 < v.max_rel_error < 0.05  # bf16 outputs: a few units of 2^-8 per row


def test_one_wrong_element_fails_element_wise_and_shows_in_the_row_error(monkeypatch):
    """One element of y off by half its row's largest: a norm over 256 rows stays within
    bf16's 1.6e-2, the element bound and the per-row error do not."""
    forward = lora_launch.lora_forward

    def one_element_off(*args, **kwargs):
        y, s = forward(*args, **kwargs)
        y[7, 3] += 0.5 * y[7].abs().max()
        return y, s

    monkeypatch.setattr(lora_launch, "lora_forward", one_element_off)
    v = validate_lora(dispatch.FUSED, _case(m=256), CPU, torch.Generator().manual_seed(2))
    assert not v.passed
    assert [p.split(":")[0] for p in v.problems] == ["y"] and "magnitude bound" in v.problems[0], v.problems
    assert v.max_rel_error >= 0.45


def test_other_dropout_bits_fail(monkeypatch):
    draw = lora_launch.dropout_keep_mask

    def flipped(*args):
        mask = draw(*args).clone()
        mask[0, 0] = ~mask[0, 0]
        return mask

    monkeypatch.setattr(lora_launch, "dropout_keep_mask", flipped)
    v = validate_lora(dispatch.FUSED, _case(0.1), CPU, torch.Generator().manual_seed(3))
    assert not v.passed and any("mask kernel drew 1 bit" in p for p in v.problems), v.problems


def test_runs_that_differ_fail(monkeypatch):
    forward = lora_launch.lora_forward
    calls = []

    def drifting(*args, **kwargs):
        y, s = forward(*args, **kwargs)
        calls.append(1)
        return y + (len(calls) - 1) * 1e-3 * y.abs().max(), s

    monkeypatch.setattr(lora_launch, "lora_forward", drifting)
    v = validate_lora(dispatch.FUSED, _case(), CPU, torch.Generator().manual_seed(4))
    assert not v.passed and any("not bitwise reproducible" in p for p in v.problems), v.problems


def test_the_op_running_another_path_fails(monkeypatch):
    monkeypatch.setattr(dispatch, "choose_implementation", lambda *args: dispatch.TORCH)
    v = validate_lora(dispatch.HYBRID, _case(), CPU, torch.Generator().manual_seed(5))
    assert not v.passed and v.problems == ("the op runs torch for this problem, not hybrid",)


def test_an_implementation_that_raises_fails_without_stopping_the_run(monkeypatch):
    """tune's check turns an exception (a kernel that does not compile or launch) into a
    failed validation naming it."""

    def broken(*args, **kwargs):
        raise RuntimeError("PTX JIT compilation failed")

    monkeypatch.setattr(lora_launch, "lora_forward", broken)
    v = checked(validate_lora, dispatch.FUSED, _case(), CPU, torch.Generator().manual_seed(6))
    assert not v.passed and v.problems == ("raised RuntimeError: PTX JIT compilation failed",)

