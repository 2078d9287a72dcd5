"""The timing engine (``fastpeft.bench.timing``) on CPU: the per-call strategy's untimed call,
estimate and warm-up, the interleaving and its isolation of a failing function, and both
strategies' CUDA paths (events, L2 flush, side-stream warm-up, graph capture and its eager
fallbacks) against a stand-in for ``torch.cuda`` whose events read a simulated clock that the
steps advance. No test asserts on a measured time of the real machine."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from fastpeft.bench import timing
from fastpeft.bench.timing import (
    CPU_CLOCK, EVENTS, GRAPH, TimingBudget, interleaved_calls_ms, time_rounds, time_side_by_side, timed_calls_ms,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
FOUR_CALLS = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=4, max_reps=4)


def test_timed_calls_come_after_one_untimed_call_the_estimate_and_warm_up():
    calls = []
    budget = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=5, max_reps=5)
    samples = timed_calls_ms(lambda: calls.append(1), CPU, budget)
    assert len(samples) == 5 and all(ms >= 0.0 for ms in samples)
    assert len(calls) == 1 + 3 + 5  # prime, estimate, reps (no warm-up budget)


def test_interleaved_timing_alternates_the_functions_and_isolates_a_failing_one():
    """Each round calls every function in turn (so a slow phase of the machine hits all of
    them), every function gets exactly its reps, and one that raises mid-run is reported with
    its exception while the others finish."""
    calls: list[str] = []

    def broken() -> None:
        calls.append("c")
        if calls.count("c") == 3:
            raise RuntimeError("third call fails")

    plans = [(lambda: calls.append("a"), 8), (lambda: calls.append("b"), 5), (broken, 8)]
    results = interleaved_calls_ms(plans, CPU, rounds=4)
    assert [len(r) for r in results[:2]] == [8, 5]
    assert isinstance(results[2], RuntimeError)
    # round 1: a a b c c, round 2: a a b c (raises) , rounds 3 and 4: without c
    assert "".join(calls) == "aabcc" + "aabc" + "aab" + "aabb"


def test_side_by_side_timing_reports_each_build_or_its_failure():
    """Steps that fail to build or to warm up get their exception in their place; the others
    are timed with their full reps."""
    budget = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=4, max_reps=4)

    def no_step() -> None:
        raise ValueError("cannot build")

    def breaks_at_once():
        def step() -> None:
            raise RuntimeError("first call fails")

        return step

    results = time_side_by_side([lambda: (lambda: None), no_step, breaks_at_once, lambda: (lambda: None)], CPU,
                                budget)
    assert [len(r) for r in (results[0], results[3])] == [4, 4]
    assert isinstance(results[1], ValueError) and isinstance(results[2], RuntimeError)
    assert results[1].__traceback__ is None


# --- both strategies' CUDA paths, on a stand-in for torch.cuda -----------------------------


class FakeCuda:
    """What the timing engine uses of ``torch.cuda``, on a simulated clock (ms): a step
    advances it by its cost when it runs (not while captured: capture runs no kernels), a
    graph replay by the cost of what it captured. ``log`` lists what happened in order."""

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.stream = "default"
        self.capturing: list[float] | None = None
        self.log: list[str] = []
        self.flushes = 0

    def step(self, cost_ms: float, fails_in_capture: bool = False):
        def run() -> None:
            if self.capturing is not None:
                if fails_in_capture:
                    raise RuntimeError("operation not permitted when stream is capturing\nmore")
                self.capturing.append(cost_ms)
                self.log.append("captured")
            else:
                self.now_ms += cost_ms
                self.log.append(f"run on {self.stream}")

        return run

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class Event:
            def __init__(self, enable_timing: bool) -> None:
                assert enable_timing
                self.at_ms: float | None = None

            def record(self) -> None:
                self.at_ms = fake.now_ms

            def elapsed_time(self, end: "Event") -> float:
                return end.at_ms - self.at_ms

        class Stream:
            def __init__(self, name: str) -> None:
                self.name = name

            def wait_stream(self, other: "Stream") -> None:
                fake.log.append(f"{self.name} waits for {other.name}")

        class Graph:
            captured: list[float] = []

            def replay(self) -> None:
                fake.now_ms += sum(self.captured)
                fake.log.append("replay")

        @contextlib.contextmanager
        def on_stream(stream: Stream):
            previous, fake.stream = fake.stream, stream.name
            try:
                yield
            finally:
                fake.stream = previous

        @contextlib.contextmanager
        def graph(g: Graph):
            fake.capturing = g.captured = []
            try:
                yield
            finally:
                fake.capturing = None

        class Flush:
            def zero_(self) -> None:
                fake.flushes += 1

        cuda = types.SimpleNamespace(
            Event=Event, Stream=lambda device: Stream("side"), current_stream=lambda device: Stream(fake.stream),
            stream=on_stream, CUDAGraph=Graph, graph=graph, synchronize=lambda device=None: None,
        )
        monkeypatch.setattr(timing.torch, "cuda", cuda)
        monkeypatch.setattr(timing, "_l2_flush_buffer", lambda device: Flush())


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


def test_per_call_cuda_timing_flushes_the_l2_before_every_timed_call(fake_cuda):
    samples = timed_calls_ms(fake_cuda.step(1.5), CUDA, FOUR_CALLS)
    assert samples == [1.5] * 4
    assert fake_cuda.flushes == 3 + 4  # the estimate's calls and the timed ones; not the untimed first
    assert fake_cuda.log == ["run on default"] * (1 + 3 + 4)


def test_rounds_on_cuda_warm_up_on_a_side_stream_then_time_graph_replays(fake_cuda):
    steps = [fake_cuda.step(1.0), fake_cuda.step(3.0)]
    samples, method, note = time_rounds(steps, CUDA, FOUR_CALLS)
    assert (method, note) == (GRAPH, None)
    assert samples == [2.0] * 4  # a replay (4 ms) over its 2 steps
    assert fake_cuda.flushes == 0  # the rotation keeps caches cold, not a flush
    warm_up = ["run on side"] * 2 * (1 + 3)  # the untimed round and the 3 estimate rounds
    assert fake_cuda.log == (["side waits for default", *warm_up, "default waits for side",
                              "captured", "captured", "replay"] + ["replay"] * 4)


def test_a_failed_capture_is_timed_eagerly_with_its_reason(fake_cuda):
    steps = [fake_cuda.step(1.0), fake_cuda.step(3.0, fails_in_capture=True)]
    samples, method, note = time_rounds(steps, CUDA, FOUR_CALLS)
    assert method == EVENTS and samples == [2.0] * 4
    assert note == "capture failed: RuntimeError: operation not permitted when stream is capturing"
    assert "replay" not in fake_cuda.log
    assert fake_cuda.log[-8:] == ["run on default"] * 8  # 4 eager rounds of 2 steps


def test_rounds_that_cannot_be_captured_are_not_tried(fake_cuda):
    samples, method, note = time_rounds([fake_cuda.step(2.0)], CUDA, FOUR_CALLS, capture=False)
    assert (method, samples) == (EVENTS, [2.0] * 4)
    assert note == "capture off"
    assert "captured" not in fake_cuda.log and fake_cuda.flushes == 0


def test_rounds_on_cpu_are_timed_with_the_cpu_clock_per_call(monkeypatch):
    clock = {"s": 0.0}

    def step() -> None:
        clock["s"] += 0.003

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock["s"]))
    samples, method, note = time_rounds([step, step, step], CPU, FOUR_CALLS)
    assert (method, note) == (CPU_CLOCK, None)
    assert samples == pytest.approx([3.0] * 4)
