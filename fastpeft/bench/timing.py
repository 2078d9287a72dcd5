"""The one timing function every implementation goes through: the milliseconds of each timed
call, which reports summarize as their median and interquartile range (``spread.Spread``).

On CUDA each call is timed with CUDA events and the L2 cache is flushed before it, so no
call finds the weights or inputs cached by the previous one. On CPU each call is timed
with ``time.perf_counter``. In both, the function is called once untimed (compilation,
allocator warm-up), its cost is estimated, and warm-up and repetition counts are derived
from a time budget, as ``triton.testing.do_bench`` does.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Bytes written before each timed CUDA call: 4x the H200's 60 MB L2 (the largest L2 of the
# GPUs targeted), so nothing from the previous call survives in it.
L2_FLUSH_BYTES = 256 * 1024 * 1024
# Timed calls used to estimate one call's cost before choosing repetition counts.
ESTIMATE_CALLS = 3
# Rounds an interleaved timing (``interleaved_calls_ms``) splits each function's calls into.
# Every round calls each function in turn, so a slow phase of the machine (another process, a
# frequency step), which lasts from milliseconds to seconds, lands on all of them alike instead
# of on whichever was being timed then; 8 rounds of >= 1 call each fit the smallest budgets.
INTERLEAVE_ROUNDS = 8


@dataclass(frozen=True)
class TimingBudget:
    """How long to warm up and to measure one function (milliseconds of estimated call time),
    and the bounds on timed calls (``max_reps`` also caps warm-up calls)."""

    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int


# GPU: the full grid's 600 timings must take ~1 minute. 40 ms of calls is >= 10 calls for the
# largest case (~5 ms fwd+bwd); decode-sized calls (~20 us) stop at 200, which costs ~40 ms of
# wall time with the L2 flush and launch overhead per call and still gives a stable median.
GPU_BUDGET = TimingBudget(warmup_ms=10.0, rep_ms=40.0, min_reps=10, max_reps=200)
# CPU: calls take 0.05-300 ms; 3 reps minimum give a median and quartiles, 0.3 s per timing
# keeps the default CPU run within a few minutes. Decode-sized calls (~0.1 ms) get up to 2000
# reps: with 50 (5 ms of calls) their medians moved by 1.5x between two runs on a 2-core VM,
# as a scheduler tick or a frequency step covers a large part of the sample.
CPU_BUDGET = TimingBudget(warmup_ms=20.0, rep_ms=300.0, min_reps=3, max_reps=2000)
# Smoke runs: just enough calls to exercise the path and give a median of three (and quartiles,
# a rough spread from so few calls).
QUICK_BUDGET = TimingBudget(warmup_ms=10.0, rep_ms=0.0, min_reps=3, max_reps=3)


@functools.cache
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)


def _cuda_call_times_ms(fn: Callable[[], object], calls: int, device: torch.device) -> list[float]:
    flush = _l2_flush_buffer(device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(calls)
    ]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _cpu_call_times_ms(fn: Callable[[], object], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def call_times_ms(fn: Callable[[], object], calls: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``fn`` (CUDA events with L2 flush, or CPU clock)."""
    if device.type == "cuda":
        return _cuda_call_times_ms(fn, calls, device)
    return _cpu_call_times_ms(fn, calls)


def reps_for(estimate_ms: float, rep_ms: float, min_reps: int, max_reps: int) -> int:
    """Timed calls that fill ``rep_ms`` at ``estimate_ms`` a call, between ``min_reps`` and
    ``max_reps`` (the rule of every timing here, per call or per round)."""
    return min(max(math.ceil(rep_ms / max(estimate_ms, 1e-6)), min_reps), max_reps)


def warmed_up_reps(fn: Callable[[], object], device: torch.device, budget: TimingBudget) -> int:
    """Prepare ``fn`` for timing: one untimed call, the estimate and the warm-up; returns how
    many timed calls the budget gives it (``budget.min_reps`` to ``budget.max_reps``)."""
    fn()
    estimate_ms = max(statistics.mean(call_times_ms(fn, ESTIMATE_CALLS, device)), 1e-6)
    warmup_calls = min(math.ceil(budget.warmup_ms / estimate_ms), budget.max_reps)
    call_times_ms(fn, warmup_calls, device)
    return reps_for(estimate_ms, budget.rep_ms, budget.min_reps, budget.max_reps)


def timed_calls_ms(fn: Callable[[], object], device: torch.device, budget: TimingBudget) -> list[float]:
    """Milliseconds of each timed call of ``fn`` on ``device`` (``budget.min_reps`` to
    ``budget.max_reps`` of them), after one untimed call, the estimate and the warm-up."""
    return call_times_ms(fn, warmed_up_reps(fn, device, budget), device)


def interleaved_calls_ms(plans: Sequence[tuple[Callable[[], object], int]], device: torch.device,
                         rounds: int = INTERLEAVE_ROUNDS) -> list[list[float] | Exception]:
    """Time several warmed-up functions side by side: ``plans`` are ``(fn, reps)`` pairs
    (``warmed_up_reps``); each fn's reps are split over ``rounds`` rounds, each round calling
    every fn in turn. Returns each fn's call times, or the exception its call raised (that fn
    is then left out of later rounds; the others go on)."""
    results: list[list[float] | Exception] = [[] for _ in plans]
    for r in range(rounds):
        for i, (fn, reps) in enumerate(plans):
            samples = results[i]
            if isinstance(samples, Exception):
                continue
            try:
                samples += call_times_ms(fn, reps * (r + 1) // rounds - reps * r // rounds, device)
            except Exception as exc:  # one broken function must not stop the others
                # Without its traceback: its frames would keep the failed call's tensors (an
                # out-of-memory error's, say) alive through the other functions' rounds.
                results[i] = exc.with_traceback(None)
    return results


def time_side_by_side(builds: Sequence[Callable[[], Callable[[], object]]], device: torch.device,
                      budget: TimingBudget) -> list[list[float] | Exception]:
    """Build each step (``build()``), warm it up (``warmed_up_reps``) and time all of them
    interleaved (``interleaved_calls_ms``), so their ratios compare calls made under the same
    machine conditions. Returns, per build, its call times or the exception its build, warm-up
    or calls raised (the others go on)."""
    results: list[list[float] | Exception] = []
    planned: list[tuple[Callable[[], object], int]] = []
    timed: list[int] = []
    for build in builds:
        try:
            step = build()
            planned.append((step, warmed_up_reps(step, device, budget)))
            timed.append(len(results))
            results.append([])
        except Exception as exc:  # one broken step must not stop the others
            results.append(exc.with_traceback(None))
    for index, samples in zip(timed, interleaved_calls_ms(planned, device)):
        results[index] = samples
    return results


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronization on CUDA (for host-clock timers such as
    pytest-benchmark's); ``fn`` itself elsewhere."""
    if device.type != "cuda":
        return fn

    def call_and_wait() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call_and_wait
