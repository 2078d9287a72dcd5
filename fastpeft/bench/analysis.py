"""Everything reports need from a run, computed once: metrics, target checks, saved checks."""

from __future__ import annotations

from dataclasses import dataclass

from fastpeft.bench.results import BenchRun, MetricRow, compute_metrics
from fastpeft.bench.targets import SavedCheck, TargetCheck, check_saved_activations, check_targets


@dataclass(frozen=True)
class Analysis:
    run: BenchRun
    rows: list[MetricRow]
    target_checks: list[TargetCheck]
    saved_checks: list[SavedCheck]

    @property
    def failed(self) -> bool:
        """Errors, an interrupted run or a failed saved-activation check (timing targets do not count)."""
        return bool(self.run.errors) or self.run.interrupted or any(not c.passed for c in self.saved_checks)


def analyze(run: BenchRun) -> Analysis:
    rows = compute_metrics(run.timings)
    return Analysis(
        run,
        rows,
        check_targets(rows, run.settings["dropout_fwd_bwd"]),
        check_saved_activations(run.saved),
    )
