"""Runs the grid: for every case, times the implementations forward-only and forward+backward
(side by side: each mode's implementations interleaved, ``timing.time_side_by_side``), then
measures what each saves for backward.

- ``fwd``: inference, under ``torch.no_grad()``, dropout inactive.
- ``fwd+bwd``: training with dropout ``config.dropout``; backward computes the grads of x, A
  and B (``base``: x only, W frozen) with ``torch.autograd.grad`` against a random dy.

A failing implementation is recorded with its error and the run goes on; Ctrl-C (or the
SIGINT of ``timeout -s INT``) stops the run and keeps what was measured.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, MODES, BenchCase, CaseGrid
from fastpeft.bench.environment import describe_environment
from fastpeft.bench.errors import describe_error
from fastpeft.bench.implementations import Implementation, LoRAWeights, build_implementation, random_weights
from fastpeft.bench.memory import measure_saved_activations
from fastpeft.bench.results import BenchRun, SavedResult, TimingResult
from fastpeft.bench.spread import Spread
from fastpeft.bench.timing import TimingBudget, time_side_by_side

# Dropout of the fwd+bwd timings by default: the issue states its PEFT speed target at 0.05.
DEFAULT_DROPOUT = 0.05
# The issue states the saved-activation criterion at dropout 0.1 (with dropout, PEFT keeps a
# dropped-out copy of x); the timing dropout is separate (``BenchConfig.dropout``).
SAVED_ACTIVATIONS_DROPOUT = 0.1


@dataclass(frozen=True)
class BenchConfig:
    """What to run: the grid, implementations, device and dtype, the fwd+bwd dropout, timing."""

    grid: CaseGrid
    implementations: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    dropout: float
    budget: TimingBudget
    seed: int = 0

    def settings(self) -> dict[str, object]:
        """The configuration as plain data, for reports."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_policy": "all tensors (x, W, b, A, B, dy) in this dtype; PEFT without fp32 adapter upcast",
            "implementations": list(self.implementations),
            "dropout_fwd_bwd": self.dropout,
            "dropout_saved_activations": SAVED_ACTIVATIONS_DROPOUT,
            "modes": {
                FORWARD: "inference: no_grad, dropout off",
                FORWARD_BACKWARD: "training: dropout on, grads of x, A, B (base: x only; W frozen)",
            },
            "timing": (
                "median and interquartile range of CUDA-event times, L2 flushed before each call"
                if self.device.type == "cuda"
                else "median and interquartile range of time.perf_counter times"
            ),
            "timing_budget": vars(self.budget),
            "grid": {
                "shapes": {s.name: [s.in_features, s.out_features] for s in self.grid.shapes},
                "m": list(self.grid.ms),
                "r": list(self.grid.ranks),
            },
            "seed": self.seed,
        }


def make_inputs(
    case: BenchCase, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random x ``[M, K]`` (a leaf requiring grad) and upstream grad dy ``[M, N]``."""
    x = torch.randn(case.m, case.shape.in_features, generator=generator, device=device, dtype=dtype)
    dy = torch.randn(case.m, case.shape.out_features, generator=generator, device=device, dtype=dtype)
    return x.requires_grad_(), dy


def make_step(impl: Implementation, x: torch.Tensor, dy: torch.Tensor, mode: str) -> Callable[[], object]:
    """The function timed for ``impl`` in ``mode`` (x must require grad for ``fwd+bwd``)."""
    if mode == FORWARD:

        def forward_only() -> object:
            with torch.no_grad():
                return impl.forward(x)

        return forward_only
    grad_inputs = (x, *impl.trainable)

    def forward_backward() -> object:
        return torch.autograd.grad(impl.forward(x), grad_inputs, dy)

    return forward_backward


def _time_implementations(
    case: BenchCase, mode: str, w: LoRAWeights, x: torch.Tensor, dy: torch.Tensor, config: BenchConfig
) -> list[TimingResult]:
    """Every implementation of ``config`` on one case and mode, timed side by side
    (``timing.time_side_by_side``); one that fails to build, warm up or run gets its error and
    the others go on."""

    def build(name: str) -> Callable[[], object]:
        impl = build_implementation(name, w, config.dropout, training=mode == FORWARD_BACKWARD)
        return make_step(impl, x, dy, mode)

    names = config.implementations
    timings = time_side_by_side([functools.partial(build, name) for name in names], config.device, config.budget)
    return [TimingResult(case, mode, name, None, error=describe_error(samples)) if isinstance(samples, Exception)
            else TimingResult(case, mode, name, Spread.of_samples(samples), len(samples))
            for name, samples in zip(names, timings)]


def _measure_implementation(name: str, case: BenchCase, w: LoRAWeights, x: torch.Tensor) -> SavedResult:
    try:
        impl = build_implementation(name, w, SAVED_ACTIVATIONS_DROPOUT, training=True)
        return SavedResult(case, name, measure_saved_activations(impl.forward, x, impl.owned))
    except Exception as exc:  # one broken implementation must not stop the others
        return SavedResult(case, name, None, describe_error(exc))


def log_to_stderr(message: str) -> None:
    """Progress lines go to stderr, so the table on stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = log_to_stderr) -> BenchRun:
    """Time and measure every (case, implementation) of ``config``; progress goes to ``log``."""
    run = BenchRun(settings={**describe_environment(config.device), **config.settings()})
    generator = torch.Generator(config.device).manual_seed(config.seed)
    cases = config.grid.cases()
    start = time.perf_counter()

    def keep(results: list, result: TimingResult | SavedResult) -> None:
        results.append(result)
        if result.error is not None:
            log(f"  {result.impl} failed: {result.error}")

    try:
        for index, case in enumerate(cases, 1):
            log(f"[{index}/{len(cases)}] {case.label}  ({time.perf_counter() - start:.0f} s)")
            w = random_weights(case.shape, case.r, config.dtype, config.device, generator)
            x, dy = make_inputs(case, config.dtype, config.device, generator)
            for mode in MODES:
                for result in _time_implementations(case, mode, w, x, dy, config):
                    keep(run.timings, result)
            for name in config.implementations:
                keep(run.saved, _measure_implementation(name, case, w, x))
    except KeyboardInterrupt:
        run.interrupted = True
        log("interrupted: reporting the cases measured so far")
    return run
