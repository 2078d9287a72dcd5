"""The issue's goals for fastpeft, evaluated on a run. Timing targets are displayed, never
asserted (times vary by machine), and judged on the range of the measured ratio: met, missed,
or inconclusive when the range reaches the limit (``spread.verdict``). The saved-activation
criterion is deterministic and gets a PASS/FAIL line per case.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, BenchCase
from fastpeft.bench.implementations import FASTPEFT, PEFT
from fastpeft.bench.memory import saved_elements_limit, saved_mask_bytes_limit
from fastpeft.bench.results import MetricRow, SavedResult
from fastpeft.bench.spread import Spread, verdict

RATIO_TO_BASE = "ratio_to_base"
SPEEDUP_VS_PEFT = "speedup_vs_peft"


@dataclass(frozen=True)
class Target:
    """fastpeft's ``metric`` in ``mode`` must be <= ``limit`` (``at_most``) or >= it, on cases
    with M >= ``min_m``, and only when fwd+bwd was timed at ``dropout`` if one is given."""

    label: str
    mode: str
    metric: str
    limit: float
    at_most: bool
    min_m: int = 1
    dropout: float | None = None

    def verdict(self, measured: Spread) -> str:
        """``spread.MET``, ``MISSED`` or ``INCONCLUSIVE`` for the measured ratio and its range."""
        return verdict(measured, self.limit, self.at_most)


TARGETS: tuple[Target, ...] = (
    Target("forward <= 1.05x base F.linear at M >= 4096", FORWARD, RATIO_TO_BASE, 1.05, True, min_m=4096),
    Target("fwd+bwd <= 1.15x base frozen-layer fwd+bwd", FORWARD_BACKWARD, RATIO_TO_BASE, 1.15, True),
    Target(
        ">= 1.3x faster than PEFT fwd+bwd (dropout 0.05)", FORWARD_BACKWARD, SPEEDUP_VS_PEFT, 1.3, False, dropout=0.05
    ),
)


@dataclass(frozen=True)
class TargetCheck:
    """One target evaluated on one fastpeft case: the metric's ``value`` (with its range) and
    the ``verdict`` on it."""

    target: Target
    case: BenchCase
    value: Spread
    verdict: str


def check_targets(rows: list[MetricRow], dropout: float) -> list[TargetCheck]:
    """Every target on every fastpeft row it applies to (``dropout``: the fwd+bwd dropout of the run)."""
    checks = []
    for target in TARGETS:
        if target.dropout is not None and target.dropout != dropout:
            continue
        for row in rows:
            value = getattr(row, target.metric)
            if row.impl == FASTPEFT and row.mode == target.mode and row.case.m >= target.min_m and value is not None:
                checks.append(TargetCheck(target, row.case, value, target.verdict(value)))
    return checks


@dataclass(frozen=True)
class SavedCheck:
    """fastpeft's saved elements beyond x against ``M * r``, and its bool dropout mask's bytes
    against ``M * K``; ``peft_bytes`` for comparison."""

    case: BenchCase
    elements: int
    limit: int
    bytes: int
    peft_bytes: int | None
    mask_bytes: int = 0
    mask_limit: int = 0

    @property
    def passed(self) -> bool:
        return self.elements <= self.limit and self.mask_bytes <= self.mask_limit


def check_saved_activations(saved: list[SavedResult]) -> list[SavedCheck]:
    """The saved-activation criterion for every case where fastpeft was measured."""
    peft_bytes = {s.case: s.saved.bytes for s in saved if s.impl == PEFT and s.saved is not None}
    return [
        SavedCheck(
            s.case, s.saved.elements, saved_elements_limit(s.case.m, s.case.r), s.saved.bytes, peft_bytes.get(s.case),
            s.saved.mask_bytes, saved_mask_bytes_limit(s.case.m, s.case.shape.in_features),
        )
        for s in saved
        if s.impl == FASTPEFT and s.saved is not None
    ]
