"""The run as JSON: settings (date, device, versions, dtype...), every timing with its derived
metrics, every saved-activation measurement, and the target and criterion checks of the layer
benchmark; the end-to-end case under ``"e2e"``; the other ops (bottleneck adapter, multi-LoRA)
under ``"ops"`` (``{op name: op_bench.op_json}``).

Schema ``fastpeft-bench/4``: the layer keys (``settings``, ``interrupted``, ``timings``,
``saved_activations``, ``targets``, ``saved_activation_checks``) are there when the layer grid
ran, ``"e2e"`` (see ``e2e.e2e_json``) when the end-to-end case ran. Every time and every ratio
is ``{"value", "low", "high"}`` (``spread_json``): a time's median and interquartile range over
its ``reps`` timed calls, a ratio of medians and the range the two timings' ranges allow; every
target has a ``"verdict"``: "met", "missed" or "inconclusive" (the range reaches the limit).
``"ops"`` is there when another op ran (``/3`` had no ``"ops"``); ``/2`` had plain numbers
(``median_ms``) and a boolean ``"met"`` instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastpeft.bench.analysis import Analysis
from fastpeft.bench.cases import BenchCase
from fastpeft.bench.e2e import E2ERun, e2e_json
from fastpeft.bench.op_bench import OpAnalysis, op_json
from fastpeft.bench.spread import spread_json

SCHEMA = "fastpeft-bench/4"


def _case_fields(case: BenchCase) -> dict[str, Any]:
    shape = case.shape
    return {"shape": shape.name, "m": case.m, "n": shape.out_features, "k": shape.in_features, "r": case.r}


def to_json_dict(analysis: Analysis | None, e2e: E2ERun | None = None,
                 ops: dict[str, OpAnalysis] | None = None) -> dict[str, Any]:
    """Plain-data form of the run (see SCHEMA); times in ms, rates in TFLOP/s and tokens/s."""
    data: dict[str, Any] = {"schema": SCHEMA}
    if analysis is not None:
        data.update(_layer_json(analysis))
    if ops:
        data["ops"] = {name: op_json(op) for name, op in ops.items()}
    if e2e is not None:
        data["e2e"] = e2e_json(e2e)
    return data


def _layer_json(analysis: Analysis) -> dict[str, Any]:
    return {
        "settings": analysis.run.settings,
        "interrupted": analysis.run.interrupted,
        "timings": [
            {
                **_case_fields(r.case),
                "mode": r.mode,
                "impl": r.impl,
                "ms": spread_json(r.ms),
                "reps": r.reps,
                "ratio_to_base": spread_json(r.ratio_to_base),
                "tflops": r.tflops,
                "speedup_vs_peft": spread_json(r.speedup_vs_peft),
                "error": r.error,
            }
            for r in analysis.rows
        ],
        "saved_activations": [
            {
                **_case_fields(s.case),
                "impl": s.impl,
                "bytes": None if s.saved is None else s.saved.bytes,
                "elements": None if s.saved is None else s.saved.elements,
                "storages": None if s.saved is None else s.saved.storages,
                "error": s.error,
            }
            for s in analysis.run.saved
        ],
        "targets": [
            {**_case_fields(c.case), "target": c.target.label, "value": spread_json(c.value), "verdict": c.verdict}
            for c in analysis.target_checks
        ],
        "saved_activation_checks": [
            {**_case_fields(c.case), "elements": c.elements, "limit": c.limit, "mask_bytes": c.mask_bytes,
             "mask_limit": c.mask_limit, "passed": c.passed}
            for c in analysis.saved_checks
        ],
    }


def write_json(analysis: Analysis | None, path: Path, e2e: E2ERun | None = None,
               ops: dict[str, OpAnalysis] | None = None) -> None:
    path.write_text(json.dumps(to_json_dict(analysis, e2e, ops), indent=1) + "\n")
