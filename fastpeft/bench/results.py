"""Raw measurements of a run and the metrics derived from them (ratios, TFLOP/s, speedups).

Every ratio compares two implementations timed in the same run on the same case and mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastpeft.bench.cases import BenchCase, lora_flops
from fastpeft.bench.implementations import BASE, PEFT
from fastpeft.bench.memory import SavedActivations


@dataclass(frozen=True)
class TimingResult:
    """Median time of one implementation on one case in one mode, or why it failed."""

    case: BenchCase
    mode: str
    impl: str
    median_ms: float | None
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
        timing_errors = [f"{t.case.label} {t.mode} {t.impl}: {t.error}" for t in self.timings if t.error]
        saved_errors = [f"{s.case.label} saved-activations {s.impl}: {s.error}" for s in self.saved if s.error]
        return timing_errors + saved_errors


@dataclass(frozen=True)
class MetricRow:
    """Derived metrics of one timing: ``ratio_to_base`` = t / t(base), ``speedup_vs_peft`` =
    t(peft) / t; both None where either time is missing."""

    case: BenchCase
    mode: str
    impl: str
    median_ms: float | None
    ratio_to_base: float | None
    tflops: float | None
    speedup_vs_peft: float | None
    error: str | None


def time_ratio(numerator_ms: float | None, denominator_ms: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing."""
    if numerator_ms is None or denominator_ms is None:
        return None
    return numerator_ms / denominator_ms


def tflops(case: BenchCase, mode: str, impl: str, median_ms: float | None) -> float | None:
    """TFLOP/s of the work ``impl`` does (the base layer counts no LoRA FLOPs)."""
    if median_ms is None:
        return None
    r = 0 if impl == BASE else case.r
    flops = lora_flops(case.m, case.shape.out_features, case.shape.in_features, r, mode)
    return flops / (median_ms * 1e-3) / 1e12


def compute_metrics(timings: list[TimingResult]) -> list[MetricRow]:
    """One ``MetricRow`` per timing, in the same order."""
    times = {(t.case, t.mode, t.impl): t.median_ms for t in timings}
    return [
        MetricRow(
            case=t.case,
            mode=t.mode,
            impl=t.impl,
            median_ms=t.median_ms,
            ratio_to_base=time_ratio(t.median_ms, times.get((t.case, t.mode, BASE))),
            tflops=tflops(t.case, t.mode, t.impl, t.median_ms),
            speedup_vs_peft=time_ratio(times.get((t.case, t.mode, PEFT)), t.median_ms),
            error=t.error,
        )
        for t in timings
    ]
