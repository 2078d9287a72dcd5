"""Validate, time, choose: what ``fastpeft tune`` does on one device, for every op asked for
(``fastpeft.tune.ops``: the LoRA linear op, the bottleneck adapter, multi-LoRA).

1. Every implementation ``auto`` may choose for each op is checked against float64 at odd
   shapes (partial tiles in every dimension), with and without dropout (the op's
   ``validate``). An implementation that fails any check of the run (an odd shape, a timed
   case, or raising) has ``passed`` false in every entry of its op: never chosen.
2. Case by case (each op's ``cases``, taken in turn from each op so that a short budget still
   covers every op), each implementation is checked at the case's own shape and then all are
   timed side by side with the torch path (``fastpeft.bench.timing.time_side_by_side``:
   interleaved rounds, the L2 flushed before each call on a GPU; median and interquartile
   range), with HF PEFT's layer beside the LoRA op when installed.
3. The entries form the per-device table (``fastpeft.kernels.tuned_table``), whose choice per
   shape is the fastest implementation that passed, where its spread lies below the torch
   path's. The cases are taken in order until the time budget runs out; the table holds those
   done (``TuneResult.interrupted`` says so).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastpeft.bench.spread import Spread
from fastpeft.bench.timing import TimingBudget, time_side_by_side
from fastpeft.kernels.tuned_table import SCHEMA, TORCH, choose
from fastpeft.tune.checks import Problem, Validation, checked
from fastpeft.tune.ops import TUNERS, OpTuner
from fastpeft.tune.progress import Progress
from fastpeft.tune.shapes import Grid

# The generator seed of every input: a rerun validates and times the same tensors.
SEED = 20261207


@dataclass(frozen=True)
class TuneConfig:
    """One tuning run: the device and its fingerprint (the table's ``device``), the ops to tune
    (keys of ``TUNERS``), what to cover (``grid``), the timing budget per implementation and
    the run's overall time budget; ``time_peft``: time HF PEFT's ``lora.Linear`` beside the
    LoRA op (the reference users compare with), when installed."""

    device: torch.device
    fingerprint: dict
    ops: tuple[str, ...]
    grid: Grid
    timing: TimingBudget
    time_budget_s: float
    time_peft: bool = False

    def implementations(self, op: str) -> tuple[str, ...]:
        return TUNERS[op].implementations(self.device)


@dataclass
class TuneResult:
    """The table, what failed validation (one line each), PEFT's times per LoRA case (when
    timed: ``{"mode", "M", "K", "N", "r", "median_us", "spread_us"}``), how many cases were done
    of those planned, and whether the time budget cut the run short."""

    table: dict
    failures: list[str] = field(default_factory=list)
    peft: list[dict] = field(default_factory=list)
    done: int = 0
    planned: int = 0

    @property
    def interrupted(self) -> bool:
        return self.done < self.planned


def plan_cases(config: TuneConfig) -> list[Problem]:
    """Every op's cases in turn (the first of each op, then the second of each, ...), each op's
    in its own order: a time budget that ends the run early still leaves every op some."""
    per_op = [TUNERS[op].cases(config.grid) for op in config.ops]
    return [p for group in itertools.zip_longest(*per_op) for p in group if p is not None]


def _entry(config: TuneConfig, problem: Problem, implementation: str, validation: Validation, ms: Spread) -> dict:
    err = validation.max_rel_error
    return {
        "device": config.fingerprint["gpu"], "op": problem.op, "mode": problem.mode,
        "dtype": str(problem.dtype).removeprefix("torch."),
        "M": problem.m, "K": problem.k, "N": problem.n, "r": problem.r,
        "implementation": implementation,
        "max_rel_error": err if math.isfinite(err) else None,
        "passed": validation.passed,
        "median_us": ms.value * 1e3, "spread_us": [ms.low * 1e3, ms.high * 1e3],
    }


class _Failures:
    """The implementations that failed a check, per op, and the lines saying where."""

    def __init__(self, result: TuneResult) -> None:
        self.result = result
        self.failed: set[tuple[str, str]] = set()

    def record(self, op: str, implementation: str, problem: Problem, what: str) -> None:
        self.failed.add((op, implementation))
        self.result.failures.append(f"{implementation} at {problem.describe()}: {what}")

    def check(self, tuner: OpTuner, implementation: str, problem: Problem, config: TuneConfig,
              generator: torch.Generator) -> Validation:
        v = checked(tuner.validate, implementation, problem, config.device, generator)
        if not v.passed:
            self.record(tuner.op, implementation, problem, "; ".join(v.problems))
        return v

    def trusted(self, op: str, implementation: str) -> bool:
        return (op, implementation) not in self.failed


def _validate_odd_shapes(config: TuneConfig, generator: torch.Generator, failures: _Failures) -> None:
    for op in config.ops:
        tuner = TUNERS[op]
        for problem in tuner.odd_problems(config.grid):
            for implementation in config.implementations(op):
                if tuner.runs_here(implementation, problem):
                    failures.check(tuner, implementation, problem, config, generator)


def _run_case(config: TuneConfig, problem: Problem, generator: torch.Generator, result: TuneResult,
              failures: _Failures) -> None:
    """Check each implementation at ``problem``, time them side by side, add the entries."""
    tuner = TUNERS[problem.op]
    impls = [i for i in config.implementations(problem.op) if tuner.runs_here(i, problem)]
    checks = {i: failures.check(tuner, i, problem, config, generator) for i in impls}
    peer = config.time_peft and tuner.has_peer
    try:
        builds = tuner.timed_steps(problem, impls, config.device, generator, peer)
    except Exception as exc:  # e.g. out of memory for the case's inputs: no implementation's fault
        result.failures.append(f"{problem.describe()} {problem.mode}: not timed, making its inputs raised "
                               f"{type(exc).__name__}: {exc}")
        return
    times = [r if isinstance(r, Exception) else Spread.of_samples(r)
             for r in time_side_by_side(builds, config.device, config.timing)]
    if peer:
        _record_peft(result, problem, times.pop())
    for i, ms in zip(impls, times):
        if isinstance(ms, Exception):
            failures.record(problem.op, i, problem, f"timing raised {type(ms).__name__}: {ms}")
            continue
        v = checks[i]
        trusted = Validation(v.max_rel_error, v.passed and failures.trusted(problem.op, i), v.problems)
        result.table["entries"].append(_entry(config, problem, i, trusted, ms))


def tune(config: TuneConfig, progress: Progress) -> TuneResult:
    """Run the three steps (module docstring) on ``config.device`` within its time budget,
    reporting on ``progress``."""
    deadline = time.monotonic() + config.time_budget_s
    generator = torch.Generator(config.device).manual_seed(SEED)
    cases = plan_cases(config)
    result = TuneResult({"schema": SCHEMA, "device": config.fingerprint, "entries": []}, planned=len(cases))
    failures = _Failures(result)
    for op in config.ops:
        progress.message(f"{op}: validating {', '.join(config.implementations(op))} on "
                         f"{len(TUNERS[op].odd_problems(config.grid))} odd-shape problems")
    # An implementation wrong anywhere (an odd shape, a timed case, a crash) is trusted nowhere.
    _validate_odd_shapes(config, generator, failures)
    progress.begin(len(cases))
    for problem in cases:
        if time.monotonic() > deadline:
            progress.message(f"time budget of {config.time_budget_s:.0f} s reached: {result.done} of {len(cases)} "
                             "cases done")
            break
        _run_case(config, problem, generator, result, failures)
        result.done += 1
        progress.case(f"{problem.op} {problem.layer} M={problem.m} r={problem.r} {problem.mode}: "
                      f"{summary_line(result.table, problem, result.peft)}")
    progress.close()
    for e in result.table["entries"]:
        e["passed"] = e["passed"] and failures.trusted(e["op"], e["implementation"])
    if failures.failed:
        progress.message("failed validation somewhere, so never chosen: "
                         f"{', '.join(f'{op} {i}' for op, i in sorted(failures.failed))}")
    return result


def _key(problem: Problem) -> tuple:
    return problem.mode, problem.m, problem.k, problem.n, problem.r


def _record_peft(result: TuneResult, problem: Problem, ms: Spread | Exception) -> None:
    if isinstance(ms, Exception):
        result.failures.append(f"PEFT's layer at {problem.describe()} {problem.mode}: timing raised "
                               f"{type(ms).__name__}: {ms}")
        return
    result.peft.append({"mode": problem.mode, "M": problem.m, "K": problem.k, "N": problem.n, "r": problem.r,
                        "median_us": ms.value * 1e3, "spread_us": [ms.low * 1e3, ms.high * 1e3]})


def summary_line(table: dict, problem: Problem, peft: Sequence[dict] = ()) -> str:
    """What the table picks for ``problem`` and its time against the torch path's (and PEFT's
    layer's, when timed)."""
    pick = choose(table, problem.op, problem.mode, problem.dtype, problem.m, problem.k, problem.n, problem.r)
    here = {e["implementation"]: e["median_us"] for e in table["entries"]
            if e["op"] == problem.op and (e["mode"], e["M"], e["K"], e["N"], e["r"]) == _key(problem)}
    if pick is None or pick not in here or TORCH not in here:
        return f"{pick or 'nothing'} (not timed against the torch path)"
    peft_us = next((p["median_us"] for p in peft if problem.op == "lora"
                    and (p["mode"], p["M"], p["K"], p["N"], p["r"]) == _key(problem)), None)
    versus_peft = "" if peft_us is None else f", {peft_us / here[pick]:.2f}x PEFT's"
    return f"{pick} (speed: {here[TORCH] / here[pick]:.2f}x the torch path's{versus_peft})"
