"""The summary of a ``scripts/gpu_run.sh`` run, and the verdict on its plumbing.

    python -m fastpeft.bench.run_summary --results DIR --steps STEPS_TSV \\
        --junit gpu=GPU_XML --junit cpu=CPU_XML [--rehearsal]

writes ``DIR/summary.txt``: the GPU (name and driver from ``nvidia-smi``), the library
versions, each step's exit status and seconds, the test counts per group (from pytest's
JUnit XML) with the failed tests, the focused benchmark's ratio table and profile totals
(``focused.json``), the tune step's validation failures and table entries (its report, from
``--tune``), the grid's and end-to-end case's state (``bench.json``), the dispatch table
written from the tune step's table (``dispatch.json``), and the plumbing problems, if any.

Test failures, failed benchmark cells and missed targets are results. Plumbing problems are
what keeps the run from answering its questions: a step that crashed or could not start, a
test group that did not run to its end, a result file missing or unreadable, more files
than a GPU run brings back (``MAX_RESULT_FILES``). The exit status is 1 when there is one.

``STEPS_TSV`` has one line per step: ``name<TAB>exit status<TAB>seconds<TAB>limit``, the exit
status ``skipped`` for a step not started (no time left, nothing to do) and 124 for one
stopped at its limit (``timeout``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpeft.bench.focused import SCHEMA as FOCUSED_SCHEMA
from fastpeft.bench.focused import counts, ops_lines, ratios_table

# A lent GPU machine brings back at most 8 files from its results folder.
MAX_RESULT_FILES = 8
SUMMARY, FOCUSED, BENCH, DISPATCH = "summary.txt", "focused.json", "bench.json", "dispatch.json"
# Failed tests named per group; the rest are in tests.log.
MAX_FAILED_NAMES = 25
# Exit statuses: pytest's "some tests failed" is a result; timeout's 124 is a step stopped at
# its limit, a result for the steps whose limit is a planned time guard.
TESTS_FAILED = 1
TIMED_OUT = 124
SKIPPED = "skipped"
# Steps stopped at their limit on purpose: the CPU test group ("time permitting"), the focused
# benchmark (its JSON is written on SIGINT) and the grid (it gets the time left). The GPU test
# group must finish: cut short, it has not answered whether the kernels are right.
TIME_GUARDED = {"tests_cpu", "focused", "tune", "grid"}
# Steps whose exit status 1 is a result: failed tests, or a grid with a failed measurement.
RESULT_STATUS_ONE = {"tests_gpu", "tests_cpu", "grid"}
# The profile's longest kernels shown per row, and their names' length (the JSON has the rest).
PROFILE_SHOWN = 3
PROFILE_NAME_CHARS = 48
# nvidia-smi gets this long to answer.
NVIDIA_SMI_TIMEOUT_S = 20


@dataclass(frozen=True)
class Step:
    """One line of the steps file."""

    name: str
    status: str
    seconds: int
    limit: int

    @property
    def code(self) -> int | None:
        return None if self.status == SKIPPED else int(self.status)


def read_steps(path: Path) -> list[Step]:
    steps = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, status, seconds, limit = line.split("\t")
            steps.append(Step(name, status, int(seconds), int(limit)))
    return steps


@dataclass(frozen=True)
class TestCounts:
    """A pytest run's JUnit XML totals and the ids of its failed or errored tests."""

    tests: int
    failures: int
    errors: int
    skipped: int
    seconds: float
    failed: tuple[str, ...]

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def read_junit(path: Path) -> TestCounts:
    """Totals over the ``testsuite`` elements of a JUnit XML file (pytest writes one; xdist
    merges its workers into it)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    seconds = 0.0
    failed = []
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
        seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return TestCounts(**total, seconds=seconds, failed=tuple(failed))


def gpu_lines() -> list[str]:
    """The GPU's name, driver and memory from ``nvidia-smi``, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return ["GPU: none (nvidia-smi not found)"]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"GPU: nvidia-smi failed ({exc})"]
    return [f"GPU: {line.strip()} (name, driver, memory)" for line in out.splitlines()] or ["GPU: none listed"]


def version_line() -> str:
    """Python and the versions of the libraries the run uses."""
    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "triton", "peft", "transformers", "pytest", "pytest-xdist", "pytest-timeout"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} missing")
    return "  ".join(parts)


def _load_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.exists():
        return None, f"{path.name} was not written"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc})"


def step_problems(steps: Sequence[Step]) -> list[str]:
    """The plumbing problems the steps' exit statuses show (see the module docstring)."""
    problems = []
    for step in steps:
        code = step.code
        if code in (None, 0) or (code == TIMED_OUT and step.name in TIME_GUARDED):
            continue
        if code == TESTS_FAILED and step.name in RESULT_STATUS_ONE:
            continue
        what = f"stopped at its {step.limit} s limit" if code == TIMED_OUT else f"exit status {code}"
        problems.append(f"step {step.name}: {what}")
    return problems


def summarize(results: Path, steps: Sequence[Step], junit: dict[str, Path], rehearsal: bool,
              plan: Path | None = None, tune: Path | None = None) -> tuple[list[str], list[str]]:
    """The summary's lines and the plumbing problems found; ``plan``: the plan step's log
    (``fastpeft plan --compare``'s output after the step's command line); ``tune``: the tune
    step's JSON report (``fastpeft tune --json``)."""
    by_name = {s.name: s for s in steps}
    problems = step_problems(steps)
    lines = [f"fastpeft scripts/gpu_run.sh{' --rehearse (CPU, no GPU)' if rehearsal else ''}", *gpu_lines(),
             version_line(), "", "steps (exit status, seconds / limit):"]
    lines += [f"  {s.name:<10} {s.status:>7}  {s.seconds:>4} s / {s.limit} s" for s in steps]

    lines += ["", "tests (JUnit counts):"]
    for group, path in junit.items():
        step = by_name.get(f"tests_{group}")
        if step is not None and step.code is None:
            lines.append(f"  {group}: not run")
            continue
        if not path.exists():
            lines.append(f"  {group}: no report (cut off before pytest wrote it)")
            if group == "gpu" or step is None or step.code != TIMED_OUT:
                problems.append(f"tests {group}: no JUnit report")
            continue
        try:
            c = read_junit(path)
        except ET.ParseError as exc:  # cut mid-write
            lines.append(f"  {group}: unreadable report ({exc})")
            problems.append(f"tests {group}: unreadable JUnit report")
            continue
        cut = " (stopped at its limit: the tests left did not run)" if step and step.code == TIMED_OUT else ""
        lines.append(f"  {group}: {c.passed} passed, {c.failures} failed, {c.errors} errors, {c.skipped} skipped "
                     f"(of {c.tests}) in {c.seconds:.0f} s{cut}")
        lines += [f"    FAILED {name}" for name in c.failed[:MAX_FAILED_NAMES]]
        if len(c.failed) > MAX_FAILED_NAMES:
            lines.append(f"    ... and {len(c.failed) - MAX_FAILED_NAMES} more (tests.log)")
        if c.tests == 0:
            problems.append(f"tests {group}: nothing collected")
        elif group == "gpu" and c.skipped == c.tests and not rehearsal:
            problems.append("tests gpu: every test skipped (no CUDA device seen)")

    lines += ["", f"focused benchmark ({FOCUSED}):"]
    focused, problem = _load_json(results / FOCUSED)
    if focused is not None and focused.get("schema") != FOCUSED_SCHEMA:
        focused, problem = None, f"{FOCUSED}: schema {focused.get('schema')!r}, expected {FOCUSED_SCHEMA!r}"
    if focused is None:
        lines.append(f"  {problem}")
        problems.append(problem)
    else:
        state = "complete" if focused["complete"] else "interrupted" if focused["interrupted"] else "cut off"
        lines.append(f"  {state} in {focused['elapsed_s']} s; cells {counts(focused)}, timed by "
                     f"{counts(focused, 'method')}")
        lines += _cell_messages(focused)
        lines.append("  xlin: time over F.linear's in the same run; fastest: fastpeft row ('?': within another's"
                     " range); peft/fastest: PEFT's time over it")
        lines += [f"  {line}" for line in ratios_table(focused)]
        lines += _profile_lines(focused.get("profile", {}))
        lines += _ops_summary(focused)

    lines += ["", "tune (fastpeft tune: validated on this GPU, timed beside the torch path; the table auto "
                  "would follow):"]
    tune_lines, problem = _tune_lines(by_name.get("tune"), tune)
    lines += tune_lines
    if problem:
        problems.append(problem)

    lines += ["", "plan (fastpeft plan --compare: the model's estimate beside each focused time):"]
    lines += _plan_lines(by_name.get("plan"), plan)

    lines += ["", f"grid and end-to-end case ({BENCH}):"]
    grid = by_name.get("grid")
    if grid is not None and grid.code is None:
        lines.append("  not run (no time left)")
    else:
        bench, problem = _load_json(results / BENCH)
        if bench is None:
            lines.append(f"  {problem}")
            problems.append(problem)
        else:
            lines += _bench_lines(bench)

    lines += ["", f"dispatch table ({DISPATCH}):"]
    dispatch = by_name.get("dispatch")
    if dispatch is None or dispatch.code is None:
        lines.append("  not written (no dispatch-table writer, or no tune report)")
    else:
        table, problem = _load_json(results / DISPATCH)
        if table is None:
            lines.append(f"  {problem}")
            problems.append(problem)
        else:
            measured = sum(isinstance(e.get("measured"), dict) for e in table.get("entries", []))
            lines.append(f"  {measured} measured entries, {len(table.get('entries', [])) - measured} fallback")

    files = sorted(p.name for p in results.iterdir())
    if SUMMARY not in files:
        files.append(SUMMARY)
    if len(files) > MAX_RESULT_FILES or any((results / f).is_dir() for f in files):
        problems.append(f"results: {len(files)} entries ({', '.join(files)}); "
                        f"at most {MAX_RESULT_FILES} files come back")
    lines += ["", f"result files ({len(files)}): {', '.join(sorted(files))}", "",
              "plumbing problems: " + ("none" if not problems else f"{len(problems)}")]
    lines += [f"  {p}" for p in problems]
    return lines, problems


def _cell_messages(focused: dict[str, Any]) -> list[str]:
    """One line per distinct failure (cells in error) and capture note, with its rows and count."""
    seen: dict[tuple[str, str], list[str]] = {}
    for t in focused["timings"]:
        if t["status"] == "error":
            seen.setdefault(("failed", t["error"]), []).append(t["impl"])
        if t["note"]:
            seen.setdefault(("eager", t["note"]), []).append(t["impl"])
    return [f"  {kind} x{len(rows)} ({', '.join(dict.fromkeys(rows))}): {message}"
            for (kind, message), rows in seen.items()]


def _ops_summary(focused: dict[str, Any]) -> list[str]:
    """The bottleneck adapter's and multi-LoRA's focused cells: counts per status, then their
    times, ratios and target verdicts (``focused.ops_lines``)."""
    ops = focused.get("ops", {})
    if not ops:
        return ["  other ops: none in this run"]
    lines = ["  other ops (cells per status; ms, ratios and targets):"]
    for name, op in ops.items():
        status: dict[str, int] = {}
        for t in op["timings"]:
            status[t["status"]] = status.get(t["status"], 0) + 1
        lines.append(f"    {name}: {status}")
        failures = dict.fromkeys(f"{t['impl']}: {t['error']}" for t in op["timings"] if t["status"] == "error")
        lines += [f"    {name} failed {failure}" for failure in failures]
    return lines + [f"    {line}" for line in ops_lines(focused)]


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    if "impls" not in profile:
        return [f"  profile: {profile.get('error', 'missing')}"]
    head = (f"  profile ({profile['shape']} M={profile['m']}, {profile['adapter_dtype']} adapters, {profile['mode']}; "
            f"{profile['times']}; kernels in {FOCUSED}):")
    lines = [head]
    for impl, entry in profile["impls"].items():
        if entry["total_us"] is None:
            lines.append(f"    {impl}: {entry['error']}")
            continue
        top = "; ".join(f"{k['name'][:PROFILE_NAME_CHARS]} {k['us']:.0f}" for k in entry["kernels"][:PROFILE_SHOWN])
        lines.append(f"    {impl}: {entry['total_us']:.0f} in all; {top}")
    return lines


def _bench_lines(bench: dict[str, Any]) -> list[str]:
    lines = []
    if "timings" in bench:
        errors = sum(1 for t in bench["timings"] if t.get("error"))
        verdicts: dict[str, int] = {}
        for t in bench.get("targets", []):
            verdicts[t["verdict"]] = verdicts.get(t["verdict"], 0) + 1
        lines.append(f"  grid: {len(bench['timings'])} timings ({errors} failed), "
                     f"{'interrupted' if bench.get('interrupted') else 'complete'}; targets {verdicts}")
    else:
        lines.append("  grid: not run (cut off during the end-to-end case)")
    e2e = bench.get("e2e")
    if e2e is None:
        lines.append("  end-to-end: not run")
        return lines
    tokens = e2e["fastpeft_vs_peft"]["tokens_per_s"]
    lines.append(f"  end-to-end: {'interrupted' if e2e['interrupted'] else 'complete'}; fastpeft/PEFT tokens/s "
                 + ("-" if tokens is None else f"{tokens['value']:.2f} ({tokens['low']:.2f}-{tokens['high']:.2f})"))
    lines += [f"    {t['target']}: {t['verdict']}" for t in e2e["targets"]]
    return lines


def _plan_lines(step: Step | None, log: Path | None) -> list[str]:
    """The plan step's comparison lines (its log less the step's "== " headers), or why there
    are none."""
    if step is None or step.code is None:
        return ["  not run"]
    if log is None or not log.exists():
        return ["  no output"]
    return [f"  {line}" for line in log.read_text().splitlines() if line and not line.startswith("== ")]


def _tune_lines(step: Step | None, report_path: Path | None) -> tuple[list[str], str | None]:
    """The tune step's outcome: cases done, the validation failures, and every table entry on
    a line (the table itself, in text: the report does not come back), or why there is none;
    and a plumbing problem (an unreadable report), if any."""
    if step is None or step.code is None:
        return ["  not run"], None
    if report_path is None or not report_path.exists():
        return [f"  no report (exit status {step.status})"], None
    report, problem = _load_json(report_path)
    if report is None:
        return [f"  {problem}"], f"tune: {problem}"
    entries = report["table"]["entries"]
    lines = [f"  {report['done']} of {report['planned']} cases{' (time budget reached)' if report['interrupted'] else ''}"
             f", {len(entries)} entries, {len(report['failures'])} validation failure(s)"]
    lines += [f"    FAILED {f}" for f in report["failures"][:MAX_FAILED_NAMES]]
    lines.append("  op          mode               M     K     N    r  implementation  passed  max row err  "
                 "median us (IQR)")
    rows = [(e, e["op"], e["implementation"], "yes" if e["passed"] else "NO",
             "-" if e["max_rel_error"] is None else f"{e['max_rel_error']:.2e}") for e in entries]
    rows += [(p, "lora", "peft (HF)", "-", "-") for p in report.get("peft", [])]  # the reference, not a choice
    for e, op, name, passed, err in rows:
        low, high = e["spread_us"]
        lines.append(f"  {op:<10}  {e['mode']:<16} {e['M']:>5} {e['K']:>5} {e['N']:>5} {e['r']:>3}  {name:<14}  "
                     f"{passed:<6}  {err:>11}  {e['median_us']:.1f} ({low:.1f}-{high:.1f})")
    return lines, None


def _junit_arg(text: str) -> tuple[str, Path]:
    group, sep, path = text.partition("=")
    if not sep or not group or not path:
        raise argparse.ArgumentTypeError(f"expected GROUP=PATH, got {text!r}")
    return group, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the summary; 1 when the run has plumbing problems, 0 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m fastpeft.bench.run_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="the run's results folder")
    parser.add_argument("--steps", type=Path, required=True, help="the steps file (name, status, seconds, limit)")
    parser.add_argument("--junit", type=_junit_arg, action="append", default=[], help="GROUP=PATH of a JUnit XML")
    parser.add_argument("--rehearsal", action="store_true", help="the run was scripts/gpu_run.sh --rehearse")
    parser.add_argument("--plan", type=Path, help="the plan step's log (fastpeft plan --compare)")
    parser.add_argument("--tune", type=Path, help="the tune step's JSON report (fastpeft tune --json)")
    args = parser.parse_args(argv)
    lines, problems = summarize(args.results, read_steps(args.steps), dict(args.junit), args.rehearsal, args.plan,
                                args.tune)
    text = "\n".join(lines) + "\n"
    (args.results / SUMMARY).write_text(text)
    print(text, end="")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
