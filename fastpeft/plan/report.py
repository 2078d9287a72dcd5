"""The plan as a table, as JSON, and beside the times a GPU measured.

JSON (schema ``SCHEMA``)::

    {"schema", "gpu": {name, device_name, sms, capability, hbm_gb_s, bf16_tflops, l2_mb},
     "model": {"launch_us", "bw_fraction", "flops_fraction", "l2_share", "bytes_target",
               "waves_target", "kernels_validated_on_gpu"},
     "rows": [PlanRow.as_json(), ...]}

``compare_lines`` reads ``fastpeft bench --focused``'s JSON (``fastpeft.bench.focused``: the
LoRA ``timings`` and the ``ops`` section's bottleneck and multi-LoRA timings) and puts each
measured median beside the plan's ``est_us`` for the same op, shape, rank, mode and path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fastpeft import backend
from fastpeft.plan import model
from fastpeft.plan.gpus import GpuSpec
from fastpeft.plan.model import PlanRow, dtype_name
from fastpeft.plan.problems import BOTTLENECK, LORA, MULTI_LORA, Problem

SCHEMA = "fastpeft-plan/1"


def _short_kernel(name: str) -> str:
    """``lora_fwd_kernel`` -> ``lora_fwd``, ``aten.mm.default`` -> ``aten.mm``."""
    return name.removesuffix("_kernel").removesuffix(".default")


def _shape(p: Problem) -> str:
    if p.op == MULTI_LORA:
        return f"{p.k}->{p.n} L={p.adapters}"
    return f"D={p.k}" if p.op == BOTTLENECK else f"{p.k}->{p.n}"


COLUMNS = ("op", "mode", "shape", "M", "r", "path", "choice", "kernel", "config", "ctas", "waves", "launches",
           "MB", "min MB", "x min", "GFLOP", "roof us", "est us", "target")
# Columns printed right-aligned (numbers).
_NUMERIC = frozenset({"M", "r", "ctas", "waves", "launches", "MB", "min MB", "x min", "GFLOP", "roof us", "est us"})


def _cells(row: PlanRow) -> list[str]:
    p = row.problem
    return [
        p.op, p.mode, _shape(p), str(p.m), str(p.r), row.path, row.choice, _short_kernel(row.kernel),
        row.config, "-" if row.ctas is None else str(row.ctas), "-" if row.waves is None else f"{row.waves:.2f}",
        str(row.launches), f"{row.bytes / 1e6:.1f}", f"{row.min_bytes / 1e6:.1f}", f"{row.bytes_ratio:.1f}",
        f"{row.flops / 1e9:.2f}", f"{row.roofline_us:.1f}", f"{row.est_us:.1f}", row.target,
    ]


def table(rows: Sequence[PlanRow]) -> str:
    """The rows as a text table (numbers right-aligned), one line per row."""
    body = [_cells(r) for r in rows]
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *body)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if name in _NUMERIC else c.ljust(w)
                         for name, c, w in zip(COLUMNS, cells, widths)).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(b) for b in body)])


def legend(gpu: GpuSpec, launch_us: float) -> list[str]:
    """What the table's columns mean, for the lines above it."""
    return [
        f"fastpeft plan for {gpu.name} ({gpu.device_name}: {gpu.sms} SMs, {gpu.hbm_gb_s:.0f} GB/s, "
        f"{gpu.bf16_tflops:.0f} bf16 TFLOP/s, {gpu.l2_mb:.0f} MB L2). Estimates, not measurements.",
        "choice: who runs the path (auto = FASTPEFT_BACKEND=auto today; validated = auto once the kernels are "
        "validated on a GPU; torch/triton/hybrid = forced). kernel/config/ctas/waves: the main Triton launch "
        "(torch path: its longest op).",
        "MB: DRAM bytes by the tiling, no L2 reuse (upper bound); min MB: the problem's minimum; x min: their "
        "ratio. roof us: max(min bytes / BW, FLOPs / peak). est us: the launches' estimated times, with L2 "
        f"reuse and {launch_us:g} us per launch.",
        f"target: bytes <= {model.BYTES_TARGET}x min and >= {model.WAVES_TARGET:g} wave for the main Triton "
        "launch (issue 19); a miss shows its ratio with L2 reuse too.",
    ]


def summary(rows: Sequence[PlanRow]) -> str:
    missed = [r for r in rows if not r.meets_target]
    return f"{len(rows)} rows, {len(missed)} miss the target"


def plan_json(rows: Sequence[PlanRow], gpu: GpuSpec, launch_us: float) -> dict[str, Any]:
    """The plan as plain data (module docstring)."""
    return {
        "schema": SCHEMA,
        "gpu": asdict(gpu),
        "model": {"launch_us": launch_us, "bw_fraction": model.BW_FRACTION, "flops_fraction": model.FLOPS_FRACTION,
                  "l2_share": model.L2_SHARE, "bytes_target": model.BYTES_TARGET,
                  "waves_target": model.WAVES_TARGET, "kernels_validated_on_gpu": backend.KERNELS_VALIDATED_ON_GPU},
        "rows": [r.as_json() for r in rows],
    }


# --- Measured beside estimated -----------------------------------------------------------

# The focused benchmark's LoRA rows named as the plan's paths (its "linear" and "peft" rows
# have no plan row); the op benchmarks' fastpeft rows share the plan's names.
_LORA_IMPLS = {"fused": "fused", "fused-tma": "fused-tma", "hybrid": "hybrid", "torch": "torch"}
_OP_IMPLS = {"torch": "torch", "triton": "triton"}


def _median_ms(ms: Any) -> tuple[float, float | None, float | None] | None:
    """(median, low, high) of a ``{"value", "low", "high"}`` time (or a bare number)."""
    if isinstance(ms, dict):
        value, low, high = ms.get("value"), ms.get("low"), ms.get("high")
    else:
        value, low, high = ms, None, None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value), low, high


def _usable(t: dict) -> bool:
    """A timing that ran as its row says (``runs``: the path it really took), without error."""
    return t.get("status", "ok") == "ok" and not t.get("error") and t.get("runs", t.get("impl")) == t.get("impl")


def _line(label: str, ms: tuple[float, float | None, float | None], row: PlanRow) -> str:
    value, low, high = ms
    spread = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""
    return (f"{label}: measured {value:.3f} ms{spread} vs est {row.est_us:.1f} us "
            f"(measured / est {value * 1e3 / row.est_us:.2f}x; roofline {row.roofline_us:.1f} us)")


def compare_lines(focused: dict, rows: Sequence[PlanRow]) -> list[str]:
    """One line per measured time of ``focused`` (``fastpeft bench --focused``'s JSON) that the
    plan has a row for: ``"op shape M: measured ms vs est_us"``; then how many it had none for."""
    index = {(r.problem.op, r.problem.mode, r.problem.m, r.problem.k, r.problem.n, r.problem.r, r.problem.adapters,
              r.path, dtype_name(r.problem.adapter_dtype)): r for r in rows}
    lines, unmatched = [], 0

    def add(key: tuple, label: str, t: dict) -> None:
        nonlocal unmatched
        ms = _median_ms(t.get("ms"))
        row = index.get(key)
        if ms is None or not _usable(t):
            return
        if row is None:
            unmatched += 1
            return
        lines.append(_line(label, ms, row))

    for t in focused.get("timings", []):
        path = _LORA_IMPLS.get(t.get("impl"))
        if path is None:
            continue
        m, k, n, r, mode = (t.get(f) for f in ("m", "k", "n", "r", "mode"))
        key = (LORA, mode, m, k, n, r, None, path, t.get("adapter_dtype"))
        add(key, f"lora {k}->{n} M={m} r={r} {mode} {path} ({t.get('adapter_dtype')} adapters)", t)
    ops = focused.get("ops", {})
    for t in ops.get(BOTTLENECK, {}).get("timings", []):
        path = _OP_IMPLS.get(t.get("impl"))
        if path is None:
            continue
        m, d, r, mode = (t.get(f) for f in ("M", "D", "R", "mode"))
        key = (BOTTLENECK, mode, m, d, d, r, None, path, "bfloat16")
        add(key, f"bottleneck D={d} M={m} R={r} {mode} {path}", t)
    for t in ops.get(MULTI_LORA, {}).get("timings", []):
        path = _OP_IMPLS.get(t.get("impl"))
        if path is None or t.get("ids") != "distinct":
            continue
        m, h, r, count, mode = (t.get(f) for f in ("T", "hidden", "r", "L", "mode"))
        key = (MULTI_LORA, mode, m, h, h, r, count, path, "bfloat16")
        add(key, f"multi-lora {h}->{h} L={count} T={m} r={r} {mode} {path}", t)
    if unmatched:
        lines.append(f"({unmatched} measured times have no plan row: a shape, rank, adapter dtype or path the "
                     "plan does not cover)")
    return lines
