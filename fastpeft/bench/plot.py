"""Plot of time / base ``F.linear`` time against M: one panel per (mode, shape), one colour per
implementation, one line style per rank, error bars from the ratio's range, the target ratios
as dotted lines."""

from __future__ import annotations

import itertools
from pathlib import Path

from fastpeft.bench.analysis import Analysis
from fastpeft.bench.cases import MODES
from fastpeft.bench.implementations import BASE
from fastpeft.bench.targets import RATIO_TO_BASE, TARGETS

LINE_STYLES = ("-", "--", ":", "-.")
# Inches per panel: wide enough for the M axis labels, short enough for 2 x 4 panels on a page.
PANEL_SIZE = (4.0, 3.2)


def write_plot(analysis: Analysis, path: Path) -> None:
    """Save the ratio-vs-M figure to ``path`` (format from its suffix, e.g. .png or .svg)."""
    from matplotlib.figure import Figure

    rows = [r for r in analysis.rows if r.impl != BASE and r.ratio_to_base is not None]
    if not rows:
        raise ValueError("nothing to plot: no implementation was timed next to base")
    shapes = list(dict.fromkeys(r.case.shape for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    ranks = sorted({r.case.r for r in rows})
    fig = Figure(figsize=(PANEL_SIZE[0] * len(shapes), PANEL_SIZE[1] * len(MODES)), layout="constrained")
    axes = fig.subplots(len(MODES), len(shapes), squeeze=False)
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    for mode, axes_row in zip(MODES, axes):
        for shape, ax in zip(shapes, axes_row):
            for impl in impls:
                for rank, style in zip(ranks, itertools.cycle(LINE_STYLES)):
                    points = sorted(
                        (r.case.m, r.ratio_to_base.value, r.ratio_to_base.low, r.ratio_to_base.high)
                        for r in rows
                        if r.mode == mode and r.case.shape == shape and r.impl == impl and r.case.r == rank
                    )
                    if points:
                        ms, ratios, lows, highs = zip(*points)
                        below = [v - low for v, low in zip(ratios, lows)]
                        above = [high - v for v, high in zip(ratios, highs)]
                        ax.errorbar(ms, ratios, yerr=(below, above), fmt=style, marker="o", markersize=3,
                                    capsize=2, color=colors[impl], label=f"{impl} r={rank}")
            for target in TARGETS:
                if target.mode == mode and target.metric == RATIO_TO_BASE:
                    ax.axhline(target.limit, color="grey", linestyle=":", linewidth=1)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{mode}  {shape.name} ({shape.in_features}->{shape.out_features})", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("time / base F.linear")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    s = analysis.run.settings
    fig.suptitle(f"fastpeft bench: {s['device_name']}, {s['dtype']}, {s['date']}", fontsize=10)
    fig.savefig(path, dpi=110)
