"""The multi-adapter LoRA op in ``fastpeft tune``: its implementations, the check of one of
them at one problem against float64, the steps timed, and the cases.

    y[t] = x[t] W^T + b + scalings[i] x[t] A_i[:r_i]^T B_i[:, :r_i]^T,   i = adapter_ids[t]

A serving op: what is tuned is the forward (inference mode; ``auto`` follows the table for
the forward only, ``fastpeft.ops.multi_lora_linear.implementation``). Each problem has
``ADAPTERS`` slots of rank R_MAX = r with mixed ranks (r, r/2, r/4, r/8: memory by rank) and
tokens assigned at random, some to no adapter (id -1).

A check (``validate``) runs the forward twice with the implementation forced
(``FASTPEFT_BACKEND``) and asks (``fastpeft.tune.checks``): that the op ran that implementation;
y against ``multi_lora_linear_ref`` (the formula, token by token) in float64, norm-wise and
element-wise within magnitude bounds; the two runs bitwise equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastpeft.bench.forced import forced_backend
from fastpeft.kernels.multi_lora.configs import DECODE_MAX_TOKENS
from fastpeft.kernels.multi_lora.ref import multi_lora_linear_ref
from fastpeft.kernels.tuned_table import INFERENCE
from fastpeft.ops.multi_lora_linear import implementation as op_implementation
from fastpeft.ops.multi_lora_linear import multi_lora_linear
from fastpeft.tune.checks import (
    CUDA,
    Build,
    Problem,
    Validation,
    compare,
    ran_other_path,
    randn,
    reproducible,
    triton_and_cuda,
)
from fastpeft.tune.numerics import magnitudes
from fastpeft.tune.shapes import Grid

OP = "multi_lora"
# Adapters per problem: a server's handful of hot adapters (the benchmark's 8), ranks halving.
ADAPTERS = 8
RANK_DIVISORS = (1, 2, 4, 8)
# Tokens with no adapter (id -1): one in eight.
NO_ADAPTER_SHARE = 0.125
# lora_alpha / r = 2 per slot (PEFT's common alpha = 2r).
SCALING = 2.0
# Odd shapes (M, K, N, R_MAX): decode, just above the decode kernels' range (the segment
# kernels) and a prefill, with partial tiles (2064 = 16 x 129) and a slot rank no rank block
# divides (24); the rehearsal's are tiny.
ODD_SHAPES = ((1, 2064, 1040, 16), (DECODE_MAX_TOKENS + 1, 1040, 2064, 64), (700, 2064, 1040, 24))
TINY_ODD_SHAPES = ((5, 48, 80, 8), (DECODE_MAX_TOKENS + 5, 80, 48, 12))
# What auto may choose: the torch path, the Triton kernels, the CUDA C++ ones where built.
implementations = triton_and_cuda


def runs_here(implementation: str, problem: Problem) -> bool:
    """The CUDA C++ kernel is a decode kernel (up to DECODE_MAX_TOKENS tokens)."""
    return implementation != CUDA or problem.m <= DECODE_MAX_TOKENS


def cases(grid: Grid) -> list[Problem]:
    """Forwards from decode up to a prefill of the training row count, per layer and slot rank."""
    return [Problem(OP, INFERENCE, m, s.in_features, s.out_features, r, grid.dtype, grid.adapter_dtype, layer=s.name)
            for m in (*grid.decode_ms, *grid.train_ms) for s in grid.layers for r in grid.ranks]


def odd_problems(grid: Grid) -> tuple[Problem, ...]:
    """The odd shapes validated before anything is timed, with both adapter dtypes
    (``Grid.odd_adapter_dtypes``)."""
    shapes = TINY_ODD_SHAPES if grid.tiny else ODD_SHAPES
    return tuple(Problem(OP, INFERENCE, m, k, n, r, grid.dtype, adapter_dtype)
                 for adapter_dtype in grid.odd_adapter_dtypes for m, k, n, r in shapes)


def _inputs(problem: Problem, device: torch.device, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``(x, W, b, lora_a, lora_b, scalings, adapter_ids, ranks)``: weights at a trained layer's
    scale, slots zero past their rank (never read), ids uniform over the slots and -1."""
    p = problem
    ranks = [max(1, p.r // RANK_DIVISORS[i % len(RANK_DIVISORS)]) for i in range(ADAPTERS)]
    lora_a = torch.zeros(ADAPTERS, p.r, p.k, device=device, dtype=p.adapter_dtype)
    lora_b = torch.zeros(ADAPTERS, p.n, p.r, device=device, dtype=p.adapter_dtype)
    for i, r in enumerate(ranks):
        lora_a[i, :r] = randn(generator, device, p.adapter_dtype, r, p.k, scale=p.k**-0.5)
        lora_b[i, :, :r] = randn(generator, device, p.adapter_dtype, p.n, r, scale=r**-0.5)
    ids = torch.randint(0, ADAPTERS, (p.m,), generator=generator, device=device)
    none = torch.rand(p.m, generator=generator, device=device) < NO_ADAPTER_SHARE
    return (randn(generator, device, p.dtype, p.m, p.k), randn(generator, device, p.dtype, p.n, p.k, scale=p.k**-0.5),
            randn(generator, device, p.dtype, p.n, scale=0.5), lora_a, lora_b,
            torch.full((ADAPTERS,), SCALING, device=device), ids.masked_fill(none, -1),
            torch.tensor(ranks, device=device))


def validate(implementation: str, problem: Problem, device: torch.device, generator: torch.Generator) -> Validation:
    """Check ``implementation`` on ``problem`` on ``device`` (module docstring)."""
    inputs = _inputs(problem, device, generator)
    x, weight, _, lora_a, lora_b = inputs[:5]
    with forced_backend(implementation):
        other = ran_other_path(op_implementation(x, weight, lora_a, lora_b, "forward"), implementation)
    if other is not None:
        return other

    def run() -> torch.Tensor:
        with forced_backend(implementation), torch.no_grad():
            return multi_lora_linear(*inputs)

    first, second = run(), run()
    problems = reproducible((first,), (second,))
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    y64 = multi_lora_linear_ref(*inputs64)
    bound, _ = magnitudes(multi_lora_linear_ref, inputs)
    worst, wrong = compare((("y", first, y64, bound),), problem.dtype)
    problems += wrong
    return Validation(worst, not problems, tuple(problems))


def timed_steps(problem: Problem, implementations: Sequence[str], device: torch.device, generator: torch.Generator,
                peer: bool) -> list[Build]:
    """Each implementation's forward on the same tokens and adapters; no peer is timed (PEFT's
    mixed batch is the multi-LoRA benchmark's)."""
    del peer
    inputs = _inputs(problem, device, generator)

    def build(forced: str) -> Build:
        def forward() -> object:
            with forced_backend(forced), torch.no_grad():
                return multi_lora_linear(*inputs)

        return lambda: forward

    return [build(i) for i in implementations]
