"""Measurements with their spread, ratios of them, and verdicts against a target.

A timing is summarized by the median of its timed calls and their interquartile range (the
25th to the 75th percentile): the middle half of the calls, which one stray slow call (a page
fault, another process taking the core) does not stretch the way it stretches the min-max
range. A ratio of two measurements spans the extremes their ranges allow:
``[a.low / b.high, a.high / b.low]`` around ``a.value / b.value``. A target counts as met or
missed only when that whole range lies on one side of its limit; a range that reaches the
limit is inconclusive. Deterministic measurements (bytes) are points: ``low == value == high``.

The range describes the calls of one run only: a machine whose load changes between runs can
still move a whole range from one run to the next.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# The verdicts of a target on a measured range.
MET, MISSED, INCONCLUSIVE = "met", "missed", "inconclusive"


@dataclass(frozen=True)
class Spread:
    """A measured ``value`` (a median, or a ratio of medians) and the range ``[low, high]``
    around it (an interquartile range, or the range of a ratio of two such ranges)."""

    value: float
    low: float
    high: float

    @classmethod
    def point(cls, value: float) -> Spread:
        """An exact value (a deterministic measurement): no spread."""
        return cls(value, value, value)

    @classmethod
    def of_samples(cls, samples: Sequence[float]) -> Spread:
        """The median of ``samples`` and their interquartile range (a point for one sample)."""
        if not samples:
            raise ValueError("no samples to summarize")
        if len(samples) == 1:
            return cls.point(samples[0])
        # "inclusive": the quartiles of the samples themselves (they are the whole population
        # of timed calls), always within [min, max]; the default would extrapolate beyond.
        low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(statistics.median(samples), low, high)

    def rate(self, amount: float) -> Spread:
        """``amount / self`` (e.g. tokens per second from a time): the bounds swap."""
        return Spread(amount / self.value, amount / self.high, amount / self.low)


def ratio(numerator: Spread | None, denominator: Spread | None) -> Spread | None:
    """``numerator / denominator`` with the widest range their ranges allow; None when either
    is missing."""
    if numerator is None or denominator is None:
        return None
    return Spread(
        numerator.value / denominator.value, numerator.low / denominator.high, numerator.high / denominator.low
    )


def verdict(measured: Spread, limit: float, at_most: bool) -> str:
    """MET when all of ``measured``'s range satisfies ``<= limit`` (``at_most``) or ``>= limit``,
    MISSED when none of it does, INCONCLUSIVE when the range reaches over the limit."""
    if at_most:
        if measured.high <= limit:
            return MET
        return MISSED if measured.low > limit else INCONCLUSIVE
    if measured.low >= limit:
        return MET
    return MISSED if measured.high < limit else INCONCLUSIVE


def spread_json(measured: Spread | None) -> dict[str, float] | None:
    """``{"value", "low", "high"}`` for JSON reports (None stays None)."""
    return None if measured is None else dataclasses.asdict(measured)
