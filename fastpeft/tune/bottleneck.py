"""The bottleneck adapter op in ``fastpeft tune``: its implementations, the check of one of
them at one problem against float64, the steps timed, and the cases.

    out = h + s * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)      (a Pfeiffer adapter)

A check (``validate``) runs the op's forward and backward twice on the same inputs and seed
with the implementation forced (the op's ``backend``), and asks (``fastpeft.tune.checks``): that
the op ran that implementation; out and the gradients of h, W_down, b_down, W_up and b_up
against ``bottleneck_adapter_ref`` in float64 (with the tests' own activation formulas,
``bottleneck_bounds``) on the same dropout mask -- the reference Philox mask wherever a kernel
ran, so a kernel drawing other bits fails -- norm-wise and element-wise within magnitude bounds
(``bottleneck_bounds.bottleneck_magnitudes``); the two runs bitwise equal.

Timed: AdapterHub's default activation (ReLU), as for LoRA: training steps without and with
dropout at the training row counts and inference forwards at every row count, at the model's
hidden size D and the widths of ``shapes.bottleneck_ranks``. The odd shapes also check GELU
and SiLU (each activation is its own compiled kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD
from fastpeft.bench.op_bench import mode_step
from fastpeft.kernels.bottleneck.ref import bottleneck_adapter_ref
from fastpeft.kernels.dropout_mask import keep_mask_philox
from fastpeft.kernels.tuned_table import INFERENCE, TRAINING, TRAINING_DROPOUT
from fastpeft.ops.bottleneck_adapter import bottleneck_adapter
from fastpeft.ops.bottleneck_adapter import implementation as op_implementation
from fastpeft.tune.bottleneck_bounds import REFERENCE_ACTIVATIONS, bottleneck_magnitudes
from fastpeft.tune.checks import (
    ODD_DROPOUTS,
    Build,
    Problem,
    Validation,
    compare,
    draw_seed,
    ran_other_path,
    randn,
    reproducible,
    triton_and_cuda,
)
from fastpeft.tune.shapes import Grid

OP = "bottleneck"
# AdapterHub's default non-linearity (seq_bn, par_bn): what the timed cases run.
ACTIVATION = "relu"
# A scaling other than 1, so a kernel that drops it fails.
SCALING = 0.75
# Odd shapes (M, D, R, activation): partial tiles in every dimension at decode, medium and large
# M (the kernels need D a multiple of 16: 2064 = 16 x 129); the rehearsal's are tiny.
ODD_SHAPES = ((1, 2064, 48, "gelu"), (33, 2064, 200, "silu"), (4100, 1040, 24, "relu"))
TINY_ODD_SHAPES = ((5, 48, 8, "gelu"), (17, 80, 20, "silu"))
# What auto may choose: the torch path, the Triton kernels, the CUDA C++ ones where built.
implementations = triton_and_cuda


def runs_here(implementation: str, problem: Problem) -> bool:
    """Every implementation runs every tuned width (both kernel paths take R up to 256)."""
    del implementation, problem
    return True


def _problem(grid: Grid, mode: str, m: int, r: int) -> Problem:
    dropout = grid.dropout_p if mode == TRAINING_DROPOUT else 0.0
    return Problem(OP, mode, m, grid.hidden, grid.hidden, r, grid.dtype, grid.adapter_dtype, dropout, ACTIVATION,
                   layer=f"adapter D={grid.hidden}")


def cases(grid: Grid) -> list[Problem]:
    """Training steps (without, then with dropout), then inference forwards from decode up."""
    planned = [_problem(grid, mode, m, r) for mode in (TRAINING, TRAINING_DROPOUT) for m in grid.train_ms
               for r in grid.bottleneck_ranks]
    planned += [_problem(grid, INFERENCE, m, r) for m in (*grid.decode_ms, *grid.train_ms) for r in grid.bottleneck_ranks]
    return planned


def odd_problems(grid: Grid) -> tuple[Problem, ...]:
    """The odd shapes validated before anything is timed, as training steps (every gradient),
    with both adapter dtypes (``Grid.odd_adapter_dtypes``)."""
    shapes = TINY_ODD_SHAPES if grid.tiny else ODD_SHAPES
    return tuple(Problem(OP, TRAINING_DROPOUT if p else TRAINING, m, d, d, r, grid.dtype, adapter_dtype, p, act)
                 for adapter_dtype in grid.odd_adapter_dtypes for m, d, r, act in shapes for p in ODD_DROPOUTS)


def _inputs(problem: Problem, device: torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    """h ``[M, D]``, W_down ``[R, D]``, b_down ``[R]``, W_up ``[D, R]``, b_up ``[D]``, dOut
    ``[M, D]``: weights at a trained adapter's scale (std ``1/sqrt(fan_in)``, biases 0.5), so
    the adapter's term is as large as h (an error in it cannot hide behind the residual)."""
    p, d, r = problem, problem.k, problem.r
    return [randn(generator, device, p.dtype, p.m, d), randn(generator, device, p.adapter_dtype, r, d, scale=d**-0.5),
            randn(generator, device, p.adapter_dtype, r, scale=0.5),
            randn(generator, device, p.adapter_dtype, d, r, scale=r**-0.5),
            randn(generator, device, p.adapter_dtype, d, scale=0.5), randn(generator, device, p.dtype, p.m, d)]


def validate(implementation: str, problem: Problem, device: torch.device, generator: torch.Generator) -> Validation:
    """Check ``implementation`` on ``problem`` on ``device`` (module docstring)."""
    p = problem
    *weights, grad_out = _inputs(p, device, generator)
    seed = draw_seed(generator, device)
    other = ran_other_path(op_implementation(weights[0], weights[1], implementation, None, True, p.dropout_p > 0),
                           implementation)
    if other is not None:
        return other

    def run() -> tuple[torch.Tensor, ...]:
        leaves = [t.detach().clone().requires_grad_() for t in weights]
        out, _, keep = torch.ops.fastpeft.bottleneck_adapter(*leaves, None, p.activation, SCALING, None, p.dropout_p,
                                                             seed, implementation, True)
        out.backward(grad_out)
        return (out.detach(), *(t.grad for t in leaves), keep)

    first, second = run(), run()
    problems = reproducible(first[:6], second[:6])
    mask = None
    if p.dropout_p > 0:
        keep = first[6]
        mask = keep.reshape(p.m, p.k) if keep.numel() else keep_mask_philox(seed, p.m, p.k, p.dropout_p)
    leaves64 = [t.detach().double().requires_grad_() for t in weights]
    out64 = bottleneck_adapter_ref(*leaves64, REFERENCE_ACTIVATIONS[p.activation], SCALING, None, p.dropout_p,
                                   dropout_mask=mask)
    out64.backward(grad_out.double())
    bounds = bottleneck_magnitudes(*weights, None, p.activation, SCALING, mask, p.dropout_p, grad_out)
    names = ("out", "h", "w_down", "b_down", "w_up", "b_up")
    expected = (out64, *(t.grad for t in leaves64))
    worst, wrong = compare([(name if name == "out" else f"d{name}", got, want, bounds[name])
                            for name, got, want in zip(names, first, expected)], p.dtype)
    problems += wrong
    return Validation(worst, not problems, tuple(problems))


def timed_steps(problem: Problem, implementations: Sequence[str], device: torch.device, generator: torch.Generator,
                peer: bool) -> list[Build]:
    """Each implementation's step (a training step, or an inference forward) on the same
    inputs; no peer is timed (AdapterHub's module is the bottleneck benchmark's)."""
    del peer
    p = problem
    training = p.mode != INFERENCE
    *weights, grad_out = _inputs(p, device, generator)
    leaves = [t.requires_grad_(training) for t in weights]

    def build(forced: str) -> Build:
        def forward() -> torch.Tensor:
            return bottleneck_adapter(*leaves, p.activation, SCALING, None, p.dropout_p, training, backend=forced)

        return lambda: mode_step(forward, FORWARD_BACKWARD if training else FORWARD, leaves, grad_out)

    return [build(i) for i in implementations]
