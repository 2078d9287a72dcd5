"""Human-readable reports of a run: one table (rich on a terminal, plain text otherwise, or
markdown) with a header (device, versions, settings) and a footer (targets, the
saved-activation PASS/FAIL lines, errors).

One table row per (case, implementation): forward and forward+backward side by side. Every
time shows its median and interquartile range, every ratio its range, and every target mark
its verdict on that range (``spread``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Sequence

from fastpeft.bench.analysis import Analysis
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, BenchCase
from fastpeft.bench.implementations import FASTPEFT
from fastpeft.bench.results import MetricRow
from fastpeft.bench.spread import INCONCLUSIVE, MET, MISSED, Spread
from fastpeft.bench.targets import RATIO_TO_BASE, SPEEDUP_VS_PEFT, TargetCheck

HEADERS = [
    "shape", "M", "r", "impl",
    "fwd ms", "fwd x base", "fwd TFLOP/s",
    "f+b ms", "f+b x base", "f+b TFLOP/s", "f+b vs PEFT",
    "saved (p=0.1)",
]
MISSING = "-"
# shape, M, r, impl: left-aligned; the numbers after them right-aligned.
TEXT_COLUMNS = 4
# Characters the 12 columns need with rich's borders (times and ratios with their ranges);
# a narrower terminal wraps lines instead of truncating every cell.
RICH_MIN_WIDTH = 200
# The table's mark for each verdict on a target.
VERDICT_MARKS = {MET: "✓", MISSED: "✗", INCONCLUSIVE: "?"}
# Significant digits of times: the spread of repeated calls is rarely below 1%.
MS_DIGITS = 3


def format_bytes(n: int) -> str:
    """``n`` bytes as B, or KiB / MiB / GiB with one decimal."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_ms(ms: float) -> str:
    """Milliseconds to MS_DIGITS significant digits, without an exponent: 0.0123, 0.512, 1234."""
    decimals = MS_DIGITS - 1 - math.floor(math.log10(ms)) if ms > 0 else 0
    return f"{ms:.{max(decimals, 0)}f}"


def format_spread(measured: Spread, fmt: Callable[[float], str], suffix: str = "") -> str:
    """The value and, unless it is exact, its range: ``1.02x (0.98-1.07)``, ``0.512 (0.501-0.530)``."""
    text = fmt(measured.value) + suffix
    if measured.low == measured.high:
        return text
    return f"{text} ({fmt(measured.low)}-{fmt(measured.high)})"


def format_ratio(measured: Spread, verdict: str | None = None) -> str:
    """A ratio to two decimals (as the targets are stated: 1.05x, 1.3x) with its range, and the
    mark of the ``verdict`` of a target on it if any."""
    text = format_spread(measured, "{:.2f}".format, "x")
    return text if verdict is None else f"{text} {VERDICT_MARKS[verdict]}"


def _cells(row: MetricRow | None, checks: dict[tuple[BenchCase, str, str], TargetCheck], with_peft: bool) -> list[str]:
    """ms, ratio to base, TFLOP/s (and speedup vs PEFT) of one mode, with target marks."""
    width = 4 if with_peft else 3
    if row is None:
        return [MISSING] * width
    if row.ms is None:
        return ["error"] + [MISSING] * (width - 1)

    def metric(value: Spread | None, metric_name: str) -> str:
        if value is None:
            return MISSING
        check = checks.get((row.case, row.mode, metric_name)) if row.impl == FASTPEFT else None
        return format_ratio(value, None if check is None else check.verdict)

    cells = [format_spread(row.ms, format_ms), metric(row.ratio_to_base, RATIO_TO_BASE), f"{row.tflops:.3g}"]
    if with_peft:
        cells.append(metric(row.speedup_vs_peft, SPEEDUP_VS_PEFT))
    return cells


def table_rows(analysis: Analysis) -> list[list[str]]:
    """The table body: one row per (case, implementation), sorted by shape, M, r (shapes and
    implementations in the order they were run)."""
    by_key = {(r.case, r.mode, r.impl): r for r in analysis.rows}
    saved = {(s.case, s.impl): s for s in analysis.run.saved}
    checks = {(c.case, c.target.mode, c.target.metric): c for c in analysis.target_checks}
    shape_order = {shape: i for i, shape in enumerate(dict.fromkeys(r.case.shape for r in analysis.rows))}
    impl_order = {impl: i for i, impl in enumerate(dict.fromkeys(r.impl for r in analysis.rows))}
    keys = sorted(
        dict.fromkeys((r.case, r.impl) for r in analysis.rows),
        key=lambda key: (shape_order[key[0].shape], key[0].m, key[0].r, impl_order[key[1]]),
    )
    body = []
    for case, impl in keys:
        measured = saved.get((case, impl))
        if measured is None:
            saved_cell = MISSING
        else:
            saved_cell = "error" if measured.saved is None else format_bytes(measured.saved.bytes)
        body.append(
            [case.shape.name, str(case.m), str(case.r), impl]
            + _cells(by_key.get((case, FORWARD, impl)), checks, with_peft=False)
            + _cells(by_key.get((case, FORWARD_BACKWARD, impl)), checks, with_peft=True)
            + [saved_cell]
        )
    return body


def header_lines(analysis: Analysis) -> list[str]:
    s = analysis.run.settings
    return [
        f"fastpeft bench  {s['date']}  {s['device']}: {s['device_name']} ({s['cpu_threads']} CPU threads)",
        f"python {s['python']}  torch {s['torch']}" + (f" (CUDA {s['cuda']})" if s["cuda"] else "")
        + f"  triton {s['triton']}  peft {s['peft']}  fastpeft {s['fastpeft']} ({s['fastpeft_path']})",
        f"dtype {s['dtype']}: {s['dtype_policy']}",
        f"{FORWARD}: {s['modes'][FORWARD]}; {FORWARD_BACKWARD}: {s['modes'][FORWARD_BACKWARD]}, "
        f"dropout {s['dropout_fwd_bwd']}",
        f"timing: {s['timing']}; 'x base' = time / base F.linear time in the same run, "
        f"'vs PEFT' = PEFT time / time; saved = activation bytes kept for backward beyond x and "
        f"weights at dropout {s['dropout_saved_activations']}",
        "ms: median (interquartile range) of the timed calls; ratios: ratio of the medians (lowest-highest "
        "ratio the two ranges allow); TFLOP/s at the median",
    ]


def _target_lines(analysis: Analysis) -> list[str]:
    lines = [
        "Targets for fastpeft (displayed, not asserted), judged on the ratio's range: "
        "✓ met, ✗ missed, ? inconclusive (the range reaches the target):"
    ]
    by_target: dict[str, list[TargetCheck]] = {}
    for check in analysis.target_checks:
        by_target.setdefault(check.target.label, []).append(check)
    for label, checks in by_target.items():
        at_most = checks[0].target.at_most
        worst = max(checks, key=lambda c: c.value.value if at_most else -c.value.value)
        counts = {v: sum(c.verdict == v for c in checks) for v in (MET, MISSED, INCONCLUSIVE)}
        lines.append(
            f"  {label}: met in {counts[MET]}/{len(checks)} cases, missed in {counts[MISSED]}, inconclusive "
            f"in {counts[INCONCLUSIVE]} (worst {format_ratio(worst.value)} at {worst.case.label})"
        )
    if not by_target:
        lines.append("  no fastpeft timing to which a target applies in this run")
    return lines


def _saved_lines(analysis: Analysis) -> list[str]:
    p = analysis.run.settings["dropout_saved_activations"]
    lines = [f"Saved-activation criterion (dropout {p}): fastpeft saves beyond x at most M*r elements plus scalars "
             "(and, on the torch path, a 1-byte-per-element M*K dropout mask)"]
    for c in analysis.saved_checks:
        peft = "" if c.peft_bytes is None else f"; PEFT saves {format_bytes(c.peft_bytes)}"
        verdict = "PASS" if c.passed else "FAIL"
        lines.append(
            f"  {verdict} {c.case.label}: {c.elements} elements + {c.mask_bytes} mask bytes "
            f"({format_bytes(c.bytes)}), limits {c.limit} / {c.mask_limit}{peft}"
        )
    if not analysis.saved_checks:
        lines.append("  fastpeft was not measured in this run")
    return lines


def footer_lines(analysis: Analysis) -> list[str]:
    lines = _target_lines(analysis) + _saved_lines(analysis)
    if analysis.run.interrupted:
        lines.append("INTERRUPTED: the run stopped early; the cases above are those measured.")
    errors = analysis.run.errors
    if errors:
        lines.append(f"Errors ({len(errors)}):")
        lines.extend(f"  {e}" for e in errors)
    return lines


def plain_table(headers: list[str], body: list[list[str]], text_columns: int = TEXT_COLUMNS) -> str:
    """Columns padded to their widest cell; the first ``text_columns`` left-aligned, the
    numbers after them right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in body])


def markdown_table(headers: list[str], body: list[list[str]]) -> str:
    rows = [headers, ["---"] * len(headers), *body]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def markdown_report(analysis: Analysis | None, sections: Sequence[str] = ()) -> str:
    """The whole report as markdown (header and footer as preformatted text): the layer
    benchmark when it ran, then ``sections`` (markdown, e.g. the end-to-end case's)."""
    fence = "```"
    lines = ["# fastpeft bench", ""]
    if analysis is not None:
        lines += [fence, *header_lines(analysis), fence, "",
                  markdown_table(HEADERS, table_rows(analysis)), "", fence, *footer_lines(analysis), fence, ""]
    return "\n".join(lines + list(sections))


def print_report(analysis: Analysis) -> None:
    """Print the report to stdout: a rich table on a terminal when rich is installed, else plain text."""
    body = table_rows(analysis)
    print("\n".join(header_lines(analysis)))
    if sys.stdout.isatty() and importlib.util.find_spec("rich") is not None:
        from rich.console import Console
        from rich.table import Column, Table

        table = Table(*(
            Column(header, no_wrap=True, justify="left" if i < TEXT_COLUMNS else "right")
            for i, header in enumerate(HEADERS)
        ))
        for row in body:
            table.add_row(*row)
        Console(width=max(Console().width, RICH_MIN_WIDTH)).print(table)
    else:
        print(plain_table(HEADERS, body))
    print("\n".join(footer_lines(analysis)))
