"""Human-readable reports of a run: one table (rich on a terminal, plain text otherwise, or
markdown) with a header (device, versions, settings) and a footer (targets, the
saved-activation PASS/FAIL lines, errors).

One table row per (case, implementation): forward and forward+backward side by side.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

from fastpeft.bench.analysis import Analysis
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, BenchCase
from fastpeft.bench.implementations import FASTPEFT
from fastpeft.bench.results import MetricRow
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
# Characters the 12 columns need with rich's borders; a narrower terminal wraps lines
# instead of truncating every cell.
RICH_MIN_WIDTH = 150


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


def _mark(check: TargetCheck | None) -> str:
    if check is None:
        return ""
    return " ✓" if check.met else " ✗"


def _cells(row: MetricRow | None, checks: dict[tuple[BenchCase, str, str], TargetCheck], with_peft: bool) -> list[str]:
    """ms, ratio to base, TFLOP/s (and speedup vs PEFT) of one mode, with target marks."""
    width = 4 if with_peft else 3
    if row is None:
        return [MISSING] * width
    if row.median_ms is None:
        return ["error"] + [MISSING] * (width - 1)

    def metric(value: float | None, metric_name: str) -> str:
        if value is None:
            return MISSING
        check = checks.get((row.case, row.mode, metric_name)) if row.impl == FASTPEFT else None
        return f"{value:.2f}x" + _mark(check)

    cells = [f"{row.median_ms:.4g}", metric(row.ratio_to_base, RATIO_TO_BASE), f"{row.tflops:.3g}"]
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
    ]


def _target_lines(analysis: Analysis) -> list[str]:
    lines = ["Targets for fastpeft (displayed, not asserted; ✓ met, ✗ missed in the table):"]
    by_target: dict[str, list[TargetCheck]] = {}
    for check in analysis.target_checks:
        by_target.setdefault(check.target.label, []).append(check)
    for label, checks in by_target.items():
        at_most = checks[0].target.at_most
        worst = max(checks, key=lambda c: c.value if at_most else -c.value)
        met = sum(c.met for c in checks)
        lines.append(f"  {label}: met in {met}/{len(checks)} cases (worst {worst.value:.2f}x at {worst.case.label})")
    if not by_target:
        lines.append("  no fastpeft timing to which a target applies in this run")
    return lines


def _saved_lines(analysis: Analysis) -> list[str]:
    p = analysis.run.settings["dropout_saved_activations"]
    lines = [f"Saved-activation criterion (dropout {p}): fastpeft saves beyond x at most M*r elements plus scalars"]
    for c in analysis.saved_checks:
        peft = "" if c.peft_bytes is None else f"; PEFT saves {format_bytes(c.peft_bytes)}"
        verdict = "PASS" if c.passed else "FAIL"
        lines.append(
            f"  {verdict} {c.case.label}: {c.elements} elements ({format_bytes(c.bytes)}), limit {c.limit}{peft}"
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
