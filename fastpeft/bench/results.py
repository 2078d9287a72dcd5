"""Raw measurements of a run and the metrics derived from them (ratios, TFLOP/s, speedups).

Every ratio compares two implementations timed in the same run on the same case and mode, and
carries the spread of both timings (``spread.ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastpeft.bench.cases import BenchCase, lora_flops
from fastpeft.bench.implementations import BASE, PEFT
from fastpeft.bench.memory import SavedActivations
from fastpeft.bench.spread import Spread, ratio


@dataclass(frozen=True)
class TimingResult:
    """Time of one implementation on one case in one mode (median and interquartile range of
    ``reps`` timed calls, in ms), or why it failed (``ms`` None)."""

    case: BenchCase
    mode: str
    impl: str
    ms: Spread | None
    reps: int = 0
    error: str | None = None


@dataclass(frozen=True)
class SavedResult:
    """Activations one implementation saved for backward on one case, or why it failed."""

    case: BenchCase
    impl: str
    saved: SavedActivations | None
    error: str | None = None


@dataclass
class BenchRun:
    """Everything a run produced. ``settings``: how it ran (device, dtype, dropout, timing...)."""

    settings: dict[str, Any]
    timings: list[TimingResult] = field(default_factory=list)
    saved: list[SavedResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def errors(self) -> list[str]:
        """One line per failed measurement."""
        timing_errors = [f"{t.case.label} {t.mode} {t.impl}: {t.error}" for t in self.timings if t.error]
        saved_errors = [f"{s.case.label} saved-activations {s.impl}: {s.error}" for s in self.saved if s.error]
        return timing_errors + saved_errors


@dataclass(frozen=True)
class MetricRow:
    """Derived metrics of one timing: ``ratio_to_base`` = t / t(base), ``speedup_vs_peft`` =
    t(peft) / t, with their ranges; both None where either time is missing. ``tflops`` at the
    median time."""

    case: BenchCase
    mode: str
    impl: str
    ms: Spread | None
    reps: int
    ratio_to_base: Spread | None
    tflops: float | None
    speedup_vs_peft: Spread | None
    error: str | None


def relative_time(numerator: Spread | None, denominator: Spread | None, same_timing: bool) -> Spread | None:
    """``numerator / denominator`` with its range (None when either is missing); exactly 1 when
    both are the same timing, whose spread cancels out."""
    if same_timing and numerator is not None:
        return Spread.point(1.0)
    return ratio(numerator, denominator)


def tflops(case: BenchCase, mode: str, impl: str, median_ms: float | None) -> float | None:
    """TFLOP/s of the work ``impl`` does (the base layer counts no LoRA FLOPs)."""
    if median_ms is None:
        return None
    r = 0 if impl == BASE else case.r
    flops = lora_flops(case.m, case.shape.out_features, case.shape.in_features, r, mode)
    return flops / (median_ms * 1e-3) / 1e12


def compute_metrics(timings: list[TimingResult]) -> list[MetricRow]:
    """One ``MetricRow`` per timing, in the same order."""
    times = {(t.case, t.mode, t.impl): t.ms for t in timings}
    return [
        MetricRow(
            case=t.case,
            mode=t.mode,
            impl=t.impl,
            ms=t.ms,
            reps=t.reps,
            ratio_to_base=relative_time(t.ms, times.get((t.case, t.mode, BASE)), t.impl == BASE),
            tflops=tflops(t.case, t.mode, t.impl, None if t.ms is None else t.ms.value),
            speedup_vs_peft=relative_time(times.get((t.case, t.mode, PEFT)), t.ms, t.impl == PEFT),
            error=t.error,
        )
        for t in timings
    ]
