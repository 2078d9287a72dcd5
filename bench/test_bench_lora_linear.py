"""pytest-benchmark cases of the LoRA linear benchmark (the ones ``fastpeft bench`` runs).

    pytest bench/                            # timed, one group per (case, mode)
    pytest bench/ --benchmark-disable -q     # smoke: every case runs once

On CUDA: the GPU grid in bf16; on CPU: the CPU grid in fp32. pytest-benchmark times with
the host clock around a synchronised call (no L2 flush, no ratio to base in one table):
``fastpeft bench`` is the reference measurement, this suite is for pytest-benchmark's
history and comparison tooling. The saved-activation criterion is asserted, being deterministic.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastpeft.bench.cases import CPU_GRID, FORWARD_BACKWARD, GPU_GRID, MODES, BenchCase, lora_flops
from fastpeft.bench.implementations import (
    BASE, FASTPEFT, LoRAWeights, build_implementation, default_implementations, random_weights,
)
from fastpeft.bench.memory import measure_saved_activations, saved_elements_limit, saved_mask_bytes_limit
from fastpeft.bench.runner import DEFAULT_DROPOUT, SAVED_ACTIVATIONS_DROPOUT, make_inputs, make_step
from fastpeft.bench.timing import synchronized

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
GRID = GPU_GRID if DEVICE.type == "cuda" else CPU_GRID
CASES = GRID.cases()


def case_id(case: BenchCase) -> str:
    """A test id usable in ``-k`` expressions (no ``/``): e.g. ``q_o-M16-r8``."""
    return f"{case.shape.name.replace('/', '_')}-M{case.m}-r{case.r}"


@functools.lru_cache(maxsize=1)  # one case's tensors at a time: the tests run case by case
def case_tensors(case: BenchCase) -> tuple[LoRAWeights, torch.Tensor, torch.Tensor]:
    """Weights, x ``[M, K]`` (requires grad) and dy ``[M, N]`` of ``case``, seeded per case."""
    generator = torch.Generator(DEVICE).manual_seed(CASES.index(case))
    weights = random_weights(case.shape, case.r, DTYPE, DEVICE, generator)
    return (weights, *make_inputs(case, DTYPE, DEVICE, generator))


@pytest.mark.parametrize(
    ("case", "mode", "impl"),
    [
        pytest.param(case, mode, impl, id=f"{case_id(case)}-{mode}-{impl}")
        for case in CASES
        for mode in MODES
        for impl in default_implementations()
    ],
)
def test_lora_linear(benchmark, case: BenchCase, mode: str, impl: str) -> None:
    weights, x, dy = case_tensors(case)
    implementation = build_implementation(impl, weights, DEFAULT_DROPOUT, training=mode == FORWARD_BACKWARD)
    benchmark.group = f"{case.label} {mode}"
    r = 0 if impl == BASE else case.r
    benchmark.extra_info["flops"] = lora_flops(case.m, case.shape.out_features, case.shape.in_features, r, mode)
    benchmark(synchronized(make_step(implementation, x, dy, mode), DEVICE))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fastpeft_saved_activations(case: BenchCase) -> None:
    """With dropout 0.1, fastpeft keeps beyond x at most M*r elements (plus scalars, and the torch
    path's 1-byte M*K dropout mask) for backward."""
    weights, x, _ = case_tensors(case)
    implementation = build_implementation(FASTPEFT, weights, SAVED_ACTIVATIONS_DROPOUT, training=True)
    saved = measure_saved_activations(implementation.forward, x, implementation.owned)
    assert saved.elements <= saved_elements_limit(case.m, case.r), saved
    assert saved.mask_bytes <= saved_mask_bytes_limit(case.m, case.shape.in_features), saved
