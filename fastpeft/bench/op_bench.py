"""What the per-op benchmarks (the bottleneck adapter, multi-LoRA) share with each other: cases,
rows, ratios, extra metrics and targets declared as data (an ``OpSpec``), one runner, one
analysis, one table and one JSON layout. The LoRA grid (``runner``, ``results``, ``report``) and
these share the timing (``timing.time_side_by_side``: the rows of one case and mode timed
interleaved), the spread of every timing and ratio and the
met / missed / inconclusive verdicts (``spread``), the step of a mode (``runner.make_step``'s
no-grad forward or ``autograd.grad`` forward+backward) and the table formatting (``report``).

An op module (``fastpeft.bench.bottleneck``, ``fastpeft.bench.multi_lora``) defines:

- its cases (frozen dataclasses with ``label`` and ``fields()``: the table's and JSON's columns),
- ``make_problem(case, dtype, device, generator)``: the tensors of a case (an ``OpProblem``),
- its rows (``OpRow``): ``build(problem, mode)`` returns the step to time, ``unavailable(device)``
  why the row cannot run here (a skipped row, with the reason, not an error),
- its ratios (``Ratio``: a time over a reference row's, or a reference's over it), per-row
  metrics (``Metric``: e.g. achieved bandwidth) and targets (``OpTarget``, displayed, never
  asserted).

Every time is the median and interquartile range of its timed calls; every ratio the ratio of
medians with the range the two ranges allow (``spread.ratio``); every target verdict is on
that range.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD
from fastpeft.bench.report import VERDICT_MARKS, format_ms, format_ratio, format_spread, markdown_table, plain_table
from fastpeft.bench.errors import describe_error
from fastpeft.bench.runner import log_to_stderr
from fastpeft.bench.spread import INCONCLUSIVE, MET, MISSED, Spread, ratio, spread_json, verdict
from fastpeft.bench.timing import TimingBudget, time_side_by_side

OK, ERROR, SKIPPED = "ok", "error", "skipped"
MISSING = "-"


class OpCase(Protocol):
    """A case of an op benchmark: hashable, with a short ``label`` and its ``fields()``."""

    @property
    def label(self) -> str: ...

    def fields(self) -> dict[str, Any]: ...


class OpProblem(Protocol):
    """The tensors of one case; ``nbytes`` sizes the focused benchmark's input rotation."""

    @property
    def nbytes(self) -> int: ...


Step = Callable[[], object]


@dataclass(frozen=True)
class OpRow:
    """One implementation. ``build(problem, mode)`` returns the zero-argument step timed in
    ``mode``; ``unavailable(device)`` says why it cannot run on ``device`` (None: it can);
    ``applies(case, mode)`` limits it to some cells (e.g. the launch floor to decode);
    ``capturable`` False: it reads device data on the host, so the focused benchmark times it
    eagerly instead of in a CUDA graph; ``compiles``: its first calls compile for seconds to
    minutes (torch.compile), so the focused benchmark times it after the others."""

    name: str
    description: str
    build: Callable[[Any, str], Step]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    applies: Callable[[Any, str], bool] = lambda case, mode: True
    capturable: bool = True
    compiles: bool = False


@dataclass(frozen=True)
class Ratio:
    """A ratio column: ``time / reference`` (``speedup`` False: < 1 is faster) or
    ``reference / time`` (``speedup`` True: > 1 is faster)."""

    label: str
    reference: str
    speedup: bool

    def of(self, ms: Spread | None, reference_ms: Spread | None, same_row: bool) -> Spread | None:
        if same_row and ms is not None:
            return Spread.point(1.0)
        return ratio(reference_ms, ms) if self.speedup else ratio(ms, reference_ms)


@dataclass(frozen=True)
class Metric:
    """A per-timing metric computed from the case, mode, row name, the time's spread and the
    run's settings: e.g. GB/s = bytes / time (``Spread.rate``). None where it does not apply.
    ``fmt`` formats one value of it."""

    label: str
    compute: Callable[[Any, str, str, Spread, dict[str, Any]], Spread | None]
    fmt: Callable[[float], str]


@dataclass(frozen=True)
class OpTarget:
    """A goal for the ``rows`` (fastpeft's) on the cells ``where(case, mode)`` holds: the ratio
    or metric named ``metric`` must be <= ``limit`` (``at_most``) or >= it."""

    label: str
    metric: str
    limit: float
    at_most: bool
    rows: tuple[str, ...]
    where: Callable[[Any, str], bool]


@dataclass(frozen=True)
class OpSpec:
    """Everything the runner, analysis and reports need to know about one op benchmark."""

    name: str
    title: str
    make_problem: Callable[[Any, torch.dtype, torch.device, torch.Generator], OpProblem]
    rows: tuple[OpRow, ...]
    modes: tuple[str, ...]
    ratios: tuple[Ratio, ...]
    metrics: tuple[Metric, ...]
    targets: tuple[OpTarget, ...]
    notes: tuple[str, ...] = ()

    def row(self, name: str) -> OpRow:
        return next(r for r in self.rows if r.name == name)


@dataclass
class OpTiming:
    """One (case, mode, row): its time (median and interquartile range of ``reps`` calls), or
    why it was skipped or failed."""

    case: OpCase
    mode: str
    row: str
    status: str = SKIPPED
    ms: Spread | None = None
    reps: int = 0
    error: str | None = None
    method: str | None = None
    note: str | None = None


@dataclass
class OpRun:
    """What one op benchmark measured, and how (``settings``)."""

    spec: OpSpec
    settings: dict[str, Any]
    timings: list[OpTiming] = field(default_factory=list)
    interrupted: bool = False

    @property
    def errors(self) -> list[str]:
        return [f"{t.case.label} {t.mode} {t.row}: {t.error}" for t in self.timings if t.status == ERROR]


def mode_step(forward: Callable[[], torch.Tensor], mode: str, grad_inputs: Sequence[torch.Tensor],
              grad_out: torch.Tensor | None) -> Step:
    """The step of ``mode``: ``forward()`` under no_grad, or forward then the grads of
    ``grad_inputs`` against ``grad_out`` (as ``runner.make_step`` does for the LoRA grid)."""
    if mode == FORWARD:

        def forward_only() -> object:
            with torch.no_grad():
                return forward()

        return forward_only
    if mode != FORWARD_BACKWARD:
        raise ValueError(f"unknown mode {mode!r}")

    def forward_backward() -> object:
        return torch.autograd.grad(forward(), tuple(grad_inputs), grad_out)

    return forward_backward


def plan(spec: OpSpec, cases: Sequence[OpCase], rows: Sequence[str], device: torch.device) -> list[OpTiming]:
    """Every (case, mode, row) cell that applies, in run order; rows unavailable on ``device``
    come skipped with the reason."""
    reasons = {name: spec.row(name).unavailable(device) for name in rows}
    cells = []
    for case in cases:
        for mode in spec.modes:
            for name in rows:
                if spec.row(name).applies(case, mode):
                    cells.append(OpTiming(case, mode, name, error=reasons[name]))
    return cells


def _time_side_by_side(cells: Sequence[OpTiming], problem: Any, spec: OpSpec, device: torch.device,
                       budget: TimingBudget, log: Callable[[str], None]) -> None:
    """Time the rows of one case and mode side by side (``timing.time_side_by_side``); a row
    that fails to build, warm up or run is recorded as an error and the others go on."""
    builds = [functools.partial(spec.row(cell.row).build, problem, cell.mode) for cell in cells]
    for cell, samples in zip(cells, time_side_by_side(builds, device, budget)):
        if isinstance(samples, Exception):
            cell.status, cell.error = ERROR, describe_error(samples)
            log(f"  {cell.mode} {cell.row} failed: {cell.error}")
        else:
            cell.ms, cell.reps, cell.status = Spread.of_samples(samples), len(samples), OK


def run_op_benchmark(spec: OpSpec, cases: Sequence[OpCase], rows: Sequence[str], device: torch.device,
                     dtype: torch.dtype, budget: TimingBudget, settings: dict[str, Any], seed: int = 0,
                     log: Callable[[str], None] = log_to_stderr) -> OpRun:
    """Time every available (case, mode, row) of ``spec``; a failing row is recorded and the run
    goes on; Ctrl-C (SIGINT) keeps what was measured."""
    run = OpRun(spec, settings, plan(spec, cases, rows, device))
    generator = torch.Generator(device).manual_seed(seed)
    by_case: dict[Any, list[OpTiming]] = {}
    for cell in run.timings:
        by_case.setdefault(cell.case, []).append(cell)
    start = time.perf_counter()
    try:
        for index, (case, cells) in enumerate(by_case.items(), 1):
            log(f"[{spec.name} {index}/{len(by_case)}] {case.label}  ({time.perf_counter() - start:.0f} s)")
            if all(c.error is not None for c in cells):  # every row unavailable here: no tensors to make
                continue
            problem = spec.make_problem(case, dtype, device, generator)
            for mode in spec.modes:
                _time_side_by_side([c for c in cells if c.mode == mode and c.error is None], problem, spec, device,
                                   budget, log)
            del problem
    except KeyboardInterrupt:
        run.interrupted = True
        log("interrupted: reporting the cases measured so far")
    for cell in run.timings:
        if cell.status == SKIPPED and cell.error is None:
            cell.error = "interrupted"
    return run


# --- analysis -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpRowMetrics:
    """One timing with its ratios and metrics (label -> spread, None where not available)."""

    timing: OpTiming
    ratios: dict[str, Spread | None]
    metrics: dict[str, Spread | None]


@dataclass(frozen=True)
class OpTargetCheck:
    target: OpTarget
    timing: OpTiming
    value: Spread
    verdict: str


@dataclass(frozen=True)
class OpAnalysis:
    run: OpRun
    rows: list[OpRowMetrics]
    checks: list[OpTargetCheck]

    @property
    def failed(self) -> bool:
        """Errors or an interrupted run (missed targets and skipped rows are results)."""
        return bool(self.run.errors) or self.run.interrupted


def analyze_op(run: OpRun) -> OpAnalysis:
    """Ratios and metrics of every timing, and every target on every cell it applies to."""
    spec = run.spec
    times = {(t.case, t.mode, t.row): t.ms for t in run.timings if t.status == OK}
    rows = []
    for t in run.timings:
        ratios = {r.label: r.of(t.ms, times.get((t.case, t.mode, r.reference)), t.row == r.reference)
                  for r in spec.ratios}
        metrics = {m.label: None if t.ms is None else m.compute(t.case, t.mode, t.row, t.ms, run.settings)
                   for m in spec.metrics}
        rows.append(OpRowMetrics(t, ratios, metrics))
    checks = []
    for target in spec.targets:
        for row in rows:
            t = row.timing
            value = {**row.ratios, **row.metrics}.get(target.metric)
            if t.row in target.rows and value is not None and target.where(t.case, t.mode):
                checks.append(OpTargetCheck(target, t, value, verdict(value, target.limit, target.at_most)))
    return OpAnalysis(run, rows, checks)


# --- reports --------------------------------------------------------------------------------


def _fmt_value(label: str, value: Spread | None, checks: dict[tuple[int, str], OpTargetCheck], timing_id: int,
               fmt: Callable[[float], str] | None = None) -> str:
    if value is None:
        return MISSING
    check = checks.get((timing_id, label))
    if fmt is None:
        return format_ratio(value, None if check is None else check.verdict)
    text = format_spread(value, fmt)
    return text if check is None else f"{text} {VERDICT_MARKS[check.verdict]}"


def op_table(analysis: OpAnalysis) -> tuple[list[str], list[list[str]], int]:
    """Headers, body (one row per case, mode and row) and the number of left-aligned columns."""
    spec = analysis.run.spec
    checks = {(id(c.timing), c.target.metric): c for c in analysis.checks}
    case_columns = list(analysis.rows[0].timing.case.fields()) if analysis.rows else []
    headers = [*case_columns, "mode", "impl", "ms", *(r.label for r in spec.ratios), *(m.label for m in spec.metrics)]
    body = []
    for row in analysis.rows:
        t = row.timing
        fields = [str(v) for v in t.case.fields().values()]
        if t.status != OK:
            body.append([*fields, t.mode, t.row, t.status] + [MISSING] * (len(spec.ratios) + len(spec.metrics)))
            continue
        cells = [format_spread(t.ms, format_ms)]
        cells += [_fmt_value(r.label, row.ratios[r.label], checks, id(t)) for r in spec.ratios]
        cells += [_fmt_value(m.label, row.metrics[m.label], checks, id(t), m.fmt) for m in spec.metrics]
        body.append([*fields, t.mode, t.row, *cells])
    return headers, body, len(case_columns) + 2


def op_footer(analysis: OpAnalysis) -> list[str]:
    """Targets (per target and row: met / missed / inconclusive counts and the worst case),
    skipped rows with their reasons, errors."""
    spec = analysis.run.spec
    lines = [f"{spec.title} targets (displayed, not asserted; judged on the range): "
             "✓ met, ✗ missed, ? inconclusive"]
    for target in spec.targets:
        by_row: dict[str, list[OpTargetCheck]] = {}
        for c in analysis.checks:
            if c.target is target:
                by_row.setdefault(c.timing.row, []).append(c)
        if not by_row:
            lines.append(f"  {target.label}: no measured cell to judge in this run")
        for row, checks in by_row.items():
            worst = max(checks, key=lambda c: c.value.value if target.at_most else -c.value.value)
            count = {v: sum(c.verdict == v for c in checks) for v in (MET, MISSED, INCONCLUSIVE)}
            lines.append(f"  {target.label} [{row}]: met {count[MET]}/{len(checks)}, missed {count[MISSED]}, "
                         f"inconclusive {count[INCONCLUSIVE]} (worst {format_spread(worst.value, '{:.3g}'.format)}"
                         f" at {worst.timing.case.label} {worst.timing.mode})")
    skipped = {t.row: t.error for t in analysis.run.timings if t.status == SKIPPED and t.error}
    lines += [f"  skipped {row}: {reason}" for row, reason in skipped.items()]
    lines += [f"  note: {note}" for note in spec.notes]
    if analysis.run.interrupted:
        lines.append("INTERRUPTED: the run stopped early; the cells above are those measured.")
    errors = analysis.run.errors
    if errors:
        lines.append(f"Errors ({len(errors)}):")
        lines += [f"  {e}" for e in errors]
    return lines


def op_report_text(analysis: OpAnalysis) -> str:
    headers, body, text_columns = op_table(analysis)
    rows = "\n".join(f"  {r.name}: {r.description}" for r in analysis.run.spec.rows)
    return "\n".join([f"{analysis.run.spec.title}:", rows, plain_table(headers, body, text_columns),
                      *op_footer(analysis)])


def op_report_markdown(analysis: OpAnalysis) -> str:
    headers, body, _ = op_table(analysis)
    spec = analysis.run.spec
    fence = "```"
    rows = [f"- `{r.name}`: {r.description}" for r in spec.rows]
    return "\n".join([f"## {spec.title}", "", *rows, "", markdown_table(headers, body), "", fence,
                      *op_footer(analysis), fence, ""])


def op_json(analysis: OpAnalysis) -> dict[str, Any]:
    """The op benchmark as plain data: every time and ratio ``{"value", "low", "high"}``,
    every target check with its verdict."""
    return {
        "settings": analysis.run.settings,
        "interrupted": analysis.run.interrupted,
        "rows": {r.name: r.description for r in analysis.run.spec.rows},
        "timings": [
            {**r.timing.case.fields(), "mode": r.timing.mode, "impl": r.timing.row, "status": r.timing.status,
             "ms": spread_json(r.timing.ms), "reps": r.timing.reps, "method": r.timing.method, "note": r.timing.note,
             "ratios": {k: spread_json(v) for k, v in r.ratios.items()},
             "metrics": {k: spread_json(v) for k, v in r.metrics.items()}, "error": r.timing.error}
            for r in analysis.rows
        ],
        "targets": [
            {**c.timing.case.fields(), "mode": c.timing.mode, "impl": c.timing.row, "target": c.target.label,
             "value": spread_json(c.value), "verdict": c.verdict}
            for c in analysis.checks
        ],
    }
