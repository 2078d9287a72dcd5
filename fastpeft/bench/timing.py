"""The timing engine of every benchmark here: one clock, two strategies, one warm-up rule.

The clock (``call_times_ms``): the milliseconds of each of n calls -- CUDA events around each
call on a GPU (with ``flush_l2``, the L2 cache flushed before each, so no call finds the
weights or inputs the previous one left there), ``time.perf_counter`` on CPU.

The strategies:

- per call (``timed_calls_ms``, ``time_side_by_side``: ``fastpeft bench``, its end-to-end and
  per-op runs): one call is one step, the L2 flushed before each; several implementations are
  timed interleaved, round by round, so a slow phase of the machine lands on all of them alike.
- per round (``time_rounds``: the focused benchmark): one round calls every step once, each
  step on its own rotated input set (the rotation, not a flush, keeps the caches cold, as a
  layer of a real model finds them); on CUDA the round is captured in a CUDA graph and its
  replays are timed (eagerly with events when the steps cannot be captured), on CPU with
  ``perf_counter``; each sample is a round's time over its number of steps.

The warm-up rule, shared (``warmed_up_reps``): the function is called once untimed
(compilation, autotuning, allocator), its cost is estimated, and warm-up and repetition counts
are derived from a time budget (``TimingBudget``), as ``triton.testing.do_bench`` does.
Reports summarize the samples as their median and interquartile range (``spread.Spread``).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastpeft.bench.errors import describe_error

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


# Focused benchmark (rounds), GPU: 20 ms of replays: 5 of the largest cell (estimated ~2 x 8 ms
# a round for PEFT's down fwd+bwd at M = 16384), 50 of a decode cell (~0.1 ms a round). No
# warm-up budget beyond the untimed call (JIT compiles, autotuning) and the 3 estimate rounds,
# which run warm. 288 cells at an estimated 0.1-0.5 s each (warm-up, capture, replays) fit the
# 3-minute budget with torch.compile's compilations and the Triton JIT.
GPU_ROUNDS_BUDGET = TimingBudget(warmup_ms=0.0, rep_ms=20.0, min_reps=5, max_reps=50)

# How a ``time_rounds`` sample was measured.
GRAPH, EVENTS, CPU_CLOCK = "cuda graph", "cuda events, eager", "perf_counter"


@functools.cache
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)


def _cuda_call_times_ms(fn: Callable[[], object], calls: int, device: torch.device, flush_l2: bool) -> list[float]:
    flush = _l2_flush_buffer(device) if flush_l2 else None
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(calls)
    ]
    for start, end in events:
        if flush is not None:
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


def call_times_ms(fn: Callable[[], object], calls: int, device: torch.device, flush_l2: bool = True) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``fn``: CUDA events on the current stream
    (after an L2 flush with ``flush_l2``), or the CPU clock."""
    if device.type == "cuda":
        return _cuda_call_times_ms(fn, calls, device, flush_l2)
    return _cpu_call_times_ms(fn, calls)


def reps_for(estimate_ms: float, rep_ms: float, min_reps: int, max_reps: int) -> int:
    """Timed calls that fill ``rep_ms`` at ``estimate_ms`` a call, between ``min_reps`` and
    ``max_reps`` (the rule of every timing here, per call or per round)."""
    return min(max(math.ceil(rep_ms / max(estimate_ms, 1e-6)), min_reps), max_reps)


def warmed_up_reps(fn: Callable[[], object], device: torch.device, budget: TimingBudget,
                   flush_l2: bool = True) -> int:
    """Prepare ``fn`` for timing: one untimed call, the estimate (``ESTIMATE_CALLS`` calls timed
    as the timed calls will be, ``flush_l2`` included) and the warm-up; returns how many timed
    calls the budget gives it (``budget.min_reps`` to ``budget.max_reps``)."""
    fn()
    estimate_ms = max(statistics.mean(call_times_ms(fn, ESTIMATE_CALLS, device, flush_l2)), 1e-6)
    warmup_calls = min(math.ceil(budget.warmup_ms / estimate_ms), budget.max_reps)
    call_times_ms(fn, warmup_calls, device, flush_l2)
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


def time_rounds(steps: Sequence[Callable[[], object]], device: torch.device, budget: TimingBudget,
                capture: bool = True) -> tuple[list[float], str, str | None]:
    """Milliseconds per call of each timed round of ``steps`` (a round calls each step once;
    a sample is its time / ``len(steps)``), how they were measured (``GRAPH``; ``EVENTS`` when
    ``capture`` is False or the capture fails; ``CPU_CLOCK``) and why a CUDA round was not
    captured (None otherwise). No L2 flush: the steps' rotated inputs keep the cache cold.

    On CUDA the warm-up runs on a side stream (capture needs the steps' first calls off the
    default stream), the warmed-up round is captured once and replayed, once untimed, then
    as many times as the warm-up's estimate and ``budget`` give."""
    calls = len(steps)

    def run_round() -> None:
        for step in steps:
            step()

    def per_call(times: list[float]) -> list[float]:
        return [t / calls for t in times]

    if device.type != "cuda":
        return per_call(call_times_ms(run_round, warmed_up_reps(run_round, device, budget), device)), CPU_CLOCK, None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        reps = warmed_up_reps(run_round, device, budget, flush_l2=False)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    note = "capture off"
    if capture:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run_round()
        except Exception as exc:  # a host sync, an op a graph cannot hold...: time it eagerly
            torch.cuda.synchronize(device)
            note = f"capture failed: {describe_error(exc)}"
        else:
            graph.replay()
            return per_call(call_times_ms(graph.replay, reps, device, flush_l2=False)), GRAPH, None
    return per_call(call_times_ms(run_round, reps, device, flush_l2=False)), EVENTS, note


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
