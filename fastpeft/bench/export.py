"""The run as JSON: settings (date, device, versions, dtype...), every timing with its derived
metrics, every saved-activation measurement, and the target and criterion checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastpeft.bench.analysis import Analysis
from fastpeft.bench.cases import BenchCase

SCHEMA = "fastpeft-bench/1"


def _case_fields(case: BenchCase) -> dict[str, Any]:
    shape = case.shape
    return {"shape": shape.name, "m": case.m, "n": shape.out_features, "k": shape.in_features, "r": case.r}


def to_json_dict(analysis: Analysis) -> dict[str, Any]:
    """Plain-data form of the analysis (see SCHEMA); times in ms, rates in TFLOP/s."""
    return {
        "schema": SCHEMA,
        "settings": analysis.run.settings,
        "interrupted": analysis.run.interrupted,
        "timings": [
            {
                **_case_fields(r.case),
                "mode": r.mode,
                "impl": r.impl,
                "median_ms": r.median_ms,
                "ratio_to_base": r.ratio_to_base,
                "tflops": r.tflops,
                "speedup_vs_peft": r.speedup_vs_peft,
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
            {**_case_fields(c.case), "target": c.target.label, "value": c.value, "met": c.met}
            for c in analysis.target_checks
        ],
        "saved_activation_checks": [
            {**_case_fields(c.case), "elements": c.elements, "limit": c.limit, "passed": c.passed}
            for c in analysis.saved_checks
        ],
    }


def write_json(analysis: Analysis, path: Path) -> None:
    path.write_text(json.dumps(to_json_dict(analysis), indent=1) + "\n")
