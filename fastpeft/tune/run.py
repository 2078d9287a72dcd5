"""Validate, time, choose: what ``fastpeft tune`` does on one device, for the LoRA linear op.

1. Every implementation ``auto`` may choose (``lora_implementations``) is checked against
   float64 at odd shapes (partial tiles in every dimension), with and without dropout
   (``validate.validate_lora``). An implementation that fails any check of the run (an odd
   shape, a timed case, or raising) has ``passed`` false in every entry: never chosen.
2. Case by case (``plan_cases``: training steps without and with dropout at the training row
   counts, then inference forwards at every row count, per layer shape and rank), each
   implementation is checked at the case's own shape and then all are timed side by side with
   the torch path (``fastpeft.bench.timing.time_side_by_side``: interleaved rounds, the L2
   flushed before each call on a GPU; median and interquartile range).
3. The entries form the per-device table (``fastpeft.kernels.tuned_table``), whose choice per
   shape is the fastest implementation that passed, where its spread lies below the torch
   path's. The cases are taken in order until the time budget runs out; the table holds those
   done (``TuneResult.interrupted`` says so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, LayerShape
from fastpeft.bench.implementations import PEFT, build_fastpeft_op, build_implementation, random_weights
from fastpeft.bench.runner import DEFAULT_DROPOUT, make_step
from fastpeft.bench.spread import Spread
from fastpeft.bench.timing import TimingBudget, time_side_by_side
from fastpeft.kernels.lora import dispatch
from fastpeft.kernels.lora.configs import MEDIUM_MAX_M, device_info
from fastpeft.kernels.tuned_table import SCHEMA, choose
from fastpeft.tune.validate import LoRACase, Validation, running, validate_lora

# The generator seed of every input: a rerun validates and times the same tensors.
SEED = 20261207
INFERENCE, TRAINING, TRAINING_DROPOUT = dispatch.INFERENCE, dispatch.TRAINING, dispatch.TUNED_TRAINING_DROPOUT


@dataclass(frozen=True)
class TuneConfig:
    """One tuning run: the device and its fingerprint (the table's ``device``), what to tune,
    the odd shapes validated first, the timing budget per implementation and the run's
    overall time budget."""

    device: torch.device
    fingerprint: dict
    shapes: tuple[LayerShape, ...]
    decode_ms: tuple[int, ...]
    train_ms: tuple[int, ...]
    ranks: tuple[int, ...]
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    implementations: tuple[str, ...]
    odd_cases: tuple[LoRACase, ...]
    timing: TimingBudget
    time_budget_s: float
    dropout_p: float = DEFAULT_DROPOUT
    # Time HF PEFT's lora.Linear beside them (the reference users compare with), when installed.
    time_peft: bool = False


@dataclass(frozen=True)
class Case:
    """A timed case: a layer shape, M rows, rank r, and the mode (a training step without or
    with dropout, or an inference forward)."""

    shape: LayerShape
    m: int
    r: int
    mode: str


@dataclass
class TuneResult:
    """The table, what failed validation (one line each), PEFT's times per case (when timed:
    ``{"mode", "M", "K", "N", "r", "median_us", "spread_us"}``), how many cases were done of
    those planned, and whether the time budget cut the run short."""

    table: dict
    failures: list[str] = field(default_factory=list)
    peft: list[dict] = field(default_factory=list)
    done: int = 0
    planned: int = 0

    @property
    def interrupted(self) -> bool:
        return self.done < self.planned


def lora_implementations(device: torch.device) -> tuple[str, ...]:
    """What ``auto`` may choose for the LoRA op on ``device``: the torch path, the fused and
    hybrid kernels, and on an sm_90 GPU the fused kernels with the TMA forward."""
    impls = [dispatch.TORCH, dispatch.FUSED, dispatch.HYBRID]
    if device.type == "cuda" and device_info(device)[1] == 90:
        impls.insert(2, dispatch.FUSED_TMA)
    return tuple(impls)


def plan_cases(config: TuneConfig) -> list[Case]:
    """The timed cases in the order they run: training steps first (where a fine-tuning run
    spends its time; without dropout, PEFT's default, then with), then inference forwards from
    decode up."""
    cases = [Case(s, m, r, mode) for mode in (TRAINING, TRAINING_DROPOUT) for m in config.train_ms
             for s in config.shapes for r in config.ranks]
    cases += [Case(s, m, r, INFERENCE) for m in (*config.decode_ms, *config.train_ms) for s in config.shapes
              for r in config.ranks]
    return cases


def _runs_here(implementation: str, m: int) -> bool:
    """fused-tma differs from fused only above the medium tiles (its kernel's M range)."""
    return implementation != dispatch.FUSED_TMA or m > MEDIUM_MAX_M


def _lora_case(config: TuneConfig, case: Case) -> LoRACase:
    dropout = config.dropout_p if case.mode == TRAINING_DROPOUT else 0.0
    return LoRACase(case.m, case.shape.in_features, case.shape.out_features, case.r, config.dtype,
                    config.adapter_dtype, dropout)


def time_case(config: TuneConfig, case: Case, implementations: Sequence[str],
              generator: torch.Generator) -> list[Spread | Exception]:
    """Each implementation's time (milliseconds: median and interquartile range) for ``case``,
    timed side by side, or the exception it raised; with ``config.time_peft``, PEFT's layer's
    last, timed in the same rounds."""
    lc = _lora_case(config, case)
    training = case.mode != INFERENCE
    w = random_weights(case.shape, case.r, config.dtype, config.device, generator, config.adapter_dtype)
    x = torch.randn(lc.m, lc.k, generator=generator, device=config.device, dtype=torch.float32).to(config.dtype)
    dy = torch.randn(lc.m, lc.n, generator=generator, device=config.device, dtype=torch.float32).to(config.dtype)
    x.requires_grad_(training)

    def build(implementation: str) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            step = make_step(build_fastpeft_op(w, lc.dropout_p, training), x, dy,
                             FORWARD_BACKWARD if training else FORWARD)

            def forced() -> object:
                with running(implementation):
                    return step()

            return forced

        return make

    def build_peft() -> Callable[[], object]:
        return make_step(build_implementation(PEFT, w, lc.dropout_p, training), x, dy,
                         FORWARD_BACKWARD if training else FORWARD)

    builds = [build(i) for i in implementations] + ([build_peft] if config.time_peft else [])
    results = time_side_by_side(builds, config.device, config.timing)
    return [r if isinstance(r, Exception) else Spread.of_samples(r) for r in results]


def _entry(config: TuneConfig, case: Case, implementation: str, validation: Validation, ms: Spread) -> dict:
    err = validation.max_rel_error
    return {
        "device": config.fingerprint["gpu"], "op": "lora", "mode": case.mode,
        "dtype": str(config.dtype).removeprefix("torch."),
        "M": case.m, "K": case.shape.in_features, "N": case.shape.out_features, "r": case.r,
        "implementation": implementation,
        "max_rel_error": err if math.isfinite(err) else None,
        "passed": validation.passed,
        "median_us": ms.value * 1e3, "spread_us": [ms.low * 1e3, ms.high * 1e3],
    }


def _validate_odd_shapes(config: TuneConfig, generator: torch.Generator, result: TuneResult) -> set[str]:
    """The implementations that fail any odd-shape check (each failure recorded)."""
    failed = set()
    for lc in config.odd_cases:
        for implementation in config.implementations:
            if not _runs_here(implementation, lc.m):
                continue
            v = _checked(implementation, lc, config, generator)
            if not v.passed:
                failed.add(implementation)
                result.failures.append(f"{implementation} at {_describe(lc)}: {'; '.join(v.problems)}")
    return failed


def _checked(implementation: str, lc: LoRACase, config: TuneConfig, generator: torch.Generator) -> Validation:
    """``validate_lora``, with an exception it raised (a kernel that does not compile or
    launch on this GPU) a failed check that says so: one broken implementation must not stop
    the others."""
    try:
        return validate_lora(implementation, lc, config.device, generator)
    except Exception as exc:  # any failure of the implementation is its result
        return Validation(float("inf"), False, (f"raised {type(exc).__name__}: {exc}",))


def _describe(lc: LoRACase) -> str:
    return f"M={lc.m} K={lc.k} N={lc.n} r={lc.r} dropout={lc.dropout_p}"


def tune(config: TuneConfig, log: Callable[[str], None]) -> TuneResult:
    """Run the three steps (module docstring) on ``config.device`` within its time budget."""
    deadline = time.monotonic() + config.time_budget_s
    generator = torch.Generator(config.device).manual_seed(SEED)
    cases = plan_cases(config)
    result = TuneResult({"schema": SCHEMA, "device": config.fingerprint, "entries": []}, planned=len(cases))
    log(f"validating {', '.join(config.implementations)} on {len(config.odd_cases)} odd-shape problems")
    # An implementation wrong anywhere (an odd shape, a timed case, a crash) is trusted nowhere.
    failed = _validate_odd_shapes(config, generator, result)
    for case in cases:
        if time.monotonic() > deadline:
            log(f"time budget of {config.time_budget_s:.0f} s reached: {result.done} of {len(cases)} cases done")
            break
        lc = _lora_case(config, case)
        impls = [i for i in config.implementations if _runs_here(i, case.m)]
        checks = {i: _checked(i, lc, config, generator) for i in impls}
        for i, v in checks.items():
            if not v.passed:
                failed.add(i)
                result.failures.append(f"{i} at {_describe(lc)}: {'; '.join(v.problems)}")
        times = time_case(config, case, impls, generator)
        if config.time_peft:
            _record_peft(result, case, times.pop())
        for i, ms in zip(impls, times):
            if isinstance(ms, Exception):
                failed.add(i)
                result.failures.append(f"{i} at {_describe(lc)}: timing raised {type(ms).__name__}: {ms}")
                continue
            passed = Validation(checks[i].max_rel_error, checks[i].passed and i not in failed, checks[i].problems)
            result.table["entries"].append(_entry(config, case, i, passed, ms))
        result.done += 1
        log(f"[{result.done}/{len(cases)}] {case.shape.name} M={case.m} r={case.r} {case.mode}: "
            f"{summary_line(result.table, case, config, result.peft)}")
    for e in result.table["entries"]:
        e["passed"] = e["passed"] and e["implementation"] not in failed
    if failed:
        log(f"failed validation somewhere, so never chosen: {', '.join(sorted(failed))}")
    return result


def _record_peft(result: TuneResult, case: Case, ms: Spread | Exception) -> None:
    if isinstance(ms, Exception):
        result.failures.append(f"PEFT's layer at {case.shape.name} M={case.m} r={case.r} {case.mode}: timing "
                               f"raised {type(ms).__name__}: {ms}")
        return
    result.peft.append({"mode": case.mode, "M": case.m, "K": case.shape.in_features, "N": case.shape.out_features,
                        "r": case.r, "median_us": ms.value * 1e3, "spread_us": [ms.low * 1e3, ms.high * 1e3]})


def summary_line(table: dict, case: Case, config: TuneConfig, peft: Sequence[dict] = ()) -> str:
    """What the table picks for ``case`` and its time against the torch path's (and PEFT's
    layer's, when timed)."""
    pick = choose(table, "lora", case.mode, config.dtype, case.m, case.shape.in_features, case.shape.out_features,
                  case.r)
    here = {e["implementation"]: e["median_us"] for e in table["entries"]
            if (e["mode"], e["M"], e["K"], e["N"], e["r"]) == (case.mode, case.m, case.shape.in_features,
                                                                case.shape.out_features, case.r)}
    if pick is None or pick not in here or dispatch.TORCH not in here:
        return f"{pick or 'nothing'} (not timed against the torch path)"
    key = (case.mode, case.m, case.shape.in_features, case.shape.out_features, case.r)
    peft_us = next((p["median_us"] for p in peft if (p["mode"], p["M"], p["K"], p["N"], p["r"]) == key), None)
    versus_peft = "" if peft_us is None else f", {peft_us / here[pick]:.2f}x PEFT's"
    return f"{pick} (speed: {here[dispatch.TORCH] / here[pick]:.2f}x the torch path's{versus_peft})"
