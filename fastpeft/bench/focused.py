"""Focused kernel benchmark (``fastpeft bench --focused``): which LoRA linear implementation is
fastest per Llama-3-8B shape, in one JSON, inside a time budget (about 3 minutes on an H200).

What runs, in this order (the most wanted cells first, so a run cut short keeps them: the
LoRA grid feeds the dispatch table), each phase under a deadline (``run_focused``):

1. the LoRA grid without its ``compile`` row, until the budget less ``ops_budget_s``;
2. the other ops' cells without their compiling rows, within ``ops_budget_s``;
3. the profile, until the budget;
4. the compiling rows (torch.compile's compilations take seconds a graph): the LoRA grid's
   ``compile`` cells, then the other ops', until the budget.

- the grid, adapter dtype by adapter dtype (fp32, PEFT's default on a bf16 model, then bf16),
  shape by shape (q/o 4096->4096, gate/up 4096->14336, down 14336->4096), M by M (16, 512,
  4096, 16384), rank 16, bf16 activations: forward (inference: no grad, dropout off) and
  forward+backward (training: dropout ``DROPOUT``, grads of x, A and B; W frozen) of each row:

  ``linear``  ``F.linear(x, W, b)``: the floor
  ``fused``   ``fastpeft.ops.lora_linear`` with ``FASTPEFT_BACKEND=triton`` (fused Triton kernels)
  ``fused-tma`` the same with ``FASTPEFT_LORA_TMA=1`` (the opt-in sm_90 TMA + persistent
              forward GEMM): on sm_90 only, at M = 4096 and 16384 only (the large-M tiles)
  ``hybrid``  the same op with ``FASTPEFT_BACKEND=hybrid`` (cuBLAS base GEMM + Triton LoRA term)
  ``torch``   the same op with ``FASTPEFT_BACKEND=torch`` (torch composite path)
  ``peft``    HF PEFT's ``lora.Linear``
  ``compile`` ``torch.compile(dynamic=True)`` of PEFT's formula (``lora_linear_ref``)

- the profile: ``torch.profiler`` of one forward+backward per row at M = 4096
  (``GPU_PROFILE_M``) on the first shape (q/o) with fp32 adapters: kernel names and device
  times per call (CPU: op names and CPU times).

  The backend a fastpeft row forces is set around the whole step, forward and backward (the
  op reads it at every call). Each cell records which path that gives on the device
  (``runs``): on CPU without ``TRITON_INTERPRET`` the fused and hybrid rows run the torch path.

Timing: ``rotation`` sets of inputs (x, dy, W, b, A, B: all distinct tensors) are cycled so
that each call reads what the previous calls have pushed out of the L2 cache, as a layer of a
real model does (its weights and input were last touched a whole layer earlier): the sets
between two uses of one set hold at least ``ROTATION_CACHE_FACTOR`` times the L2
(``rotation_count``; e.g. 5 sets for q/o at M = 16, whose 32 MiB weight fits a 60 MB L2, and
2 for the large cells). Each cell is timed per round (``timing.time_rounds``): on CUDA one
round (a call on every set) is captured in a CUDA graph after the eager warm-up (JIT compiles,
autotuning, allocator), and its replays are timed with CUDA events, as many as fit in the
budget's ``rep_ms`` (``min_reps`` to ``max_reps``); a cell's time is the median over replays
of replay time / rotation, with the interquartile range. Graphs leave Python and launch
overhead out, as a captured training step does; a row whose capture fails is timed eagerly
with events around each round instead (``method``, and why in ``note``). On CPU rounds are
timed with ``time.perf_counter`` (the rehearsal: same code, tiny shapes).

Other ops (``config.ops``, after the LoRA grid's non-compiling rows and within their own
``ops_budget_s``): the bottleneck adapter's, multi-LoRA's and QLoRA's key shapes (``OP_FOCUS``): the cells
of their targets, with the rows of ``fastpeft.bench.bottleneck`` / ``multi_lora`` / ``qlora``, timed the same
way (rotated input sets, CUDA graphs; when one of an op's rows cannot be captured -- PEFT's
mixed batch, the per-adapter loop, bitsandbytes' layers -- every row of that op eagerly with events, so that
their ratios compare like with like), reported in ``"ops"`` with
their ratios, bandwidth and target verdicts (``op_bench.op_json``).

Budget: no cell starts after ``budget_s`` (the profile included); the cells left are recorded
as skipped ("time budget"), a SIGINT (``timeout -s INT``) skips the rest as "interrupted", and
either way the JSON is written. It is also rewritten after every (adapter dtype, shape, M)
group, with ``"complete": false``, so even a killed run leaves what it measured.

JSON (schema ``SCHEMA``)::

    {"schema", "complete", "interrupted", "elapsed_s",
     "settings": {environment..., "dtype" (activations), "arch", "rank", "adapter_dtypes",
                  "dropout_fwd_bwd", "rows": {name: description}, "grid", "timing", "budget_s"},
     "timings": [{"shape", "m", "n", "k", "r", "adapter_dtype", "mode", "impl", "status",
                  "runs", "ms", "reps", "rotation", "method", "note", "tflops",
                  "ratio_to_linear", "ratio_to_peft", "error"}, ...],
     "ops": {op: {"settings", "interrupted", "rows", "timings", "targets"}},
     "fastest": [{"shape", "m", "n", "k", "adapter_dtype", "mode", "overall", "fastpeft",
                  "fastpeft_ms", "clear"}, ...],
     "profile": {"shape", "m", "n", "k", "adapter_dtype", "mode", "iters", "times", "impls":
                 {impl: {"total_us", "kernels": [{"name", "calls", "us"}], "error"}}}}

``status`` is ok, error, unavailable or skipped; ``ms`` and the two ratios are
``{"value", "low", "high"}`` (``spread``), the ratios a time over F.linear's and over PEFT's
in the same run (< 1: faster). ``fastest`` names, per cell, the fastest LoRA row (``overall``)
and the fastest fastpeft row (``fused``/``hybrid``/``torch``), ``clear`` when that row's range
lies below every other fastpeft row's. The ``settings``/``timings`` layout is the one
``python -m fastpeft.kernels.lora.dispatch --from-bench`` reads; ``--dispatch-input`` writes
the rows of one adapter dtype for it (the writer keys on rank, not adapter dtype).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental import _config as fx_config

from fastpeft import backend
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, MODES, SHAPES_BY_NAME, BenchCase, LayerShape, lora_flops
from fastpeft.bench.environment import describe_environment
from fastpeft.bench.forced import forced_backend, forced_env
from fastpeft.bench.implementations import (
    BASE, COMPILE, PEFT, Implementation, LoRAWeights, build_fastpeft_op, build_implementation, random_weights,
)
from fastpeft.bench import bottleneck, dora, multi_lora, qlora
from fastpeft.bench.op_bench import OK as OP_OK
from fastpeft.bench.op_bench import ERROR as OP_ERROR
from fastpeft.bench.op_bench import OpRun, OpSpec, analyze_op, op_json, plan
from fastpeft.bench.op_runs import BOTTLENECK, DORA, GRIDS, MULTI_LORA, QLORA
from fastpeft.bench.errors import describe_error
from fastpeft.bench.runner import DEFAULT_DROPOUT, log_to_stderr, make_step
from fastpeft.bench.spread import Spread, ratio, spread_json
from fastpeft.bench.timing import GPU_ROUNDS_BUDGET, QUICK_BUDGET, TimingBudget, time_rounds
from fastpeft.kernels.lora.configs import MEDIUM_MAX_M, TMA_ENV, device_info
from fastpeft.kernels.lora.dispatch import FUSED, FUSED_TMA, HYBRID, IMPLEMENTATIONS, TORCH

# /2 added "ops" (the bottleneck adapter and multi-LoRA cells).
SCHEMA = "fastpeft-focused/2"

LINEAR = "linear"
OK, ERROR, UNAVAILABLE, SKIPPED = "ok", "error", "unavailable", "skipped"
# The rows fastpeft can dispatch between, named as the dispatch table names them.
FASTPEFT_ROWS = IMPLEMENTATIONS
# The adapter dtype fastpeft uses on 16-bit layers by default (``LoRALinear.from_linear``),
# whose rows ``--dispatch-input`` hands to the dispatch-table writer.
DISPATCH_ADAPTER_DTYPE = torch.float32
# Dropout of the forward+backward timings: the PEFT speed target is stated at 0.05.
DROPOUT = DEFAULT_DROPOUT
# Bytes of other input sets between two uses of one set, in multiples of the L2 size: a margin
# over 1x, since the L2's replacement is not strict LRU and the A100/H100/H200 L2 is split in
# two partitions that may each hold a copy of a line.
ROTATION_CACHE_FACTOR = 2
# At least two sets even where one set outgrows the cache (the large cells) or there is no
# cache to beat (CPU), so every cell runs the same cycling code.
MIN_ROTATION = 2
# More sets than this would only be needed for sets far below the L2 size, which no cell of
# the GPU grid has (its smallest weight is 32 MiB); the cap bounds graph length and memory.
MAX_ROTATION = 16
# Profile: calls profiled per row (their times are averaged per call), calls before them
# (compiles, autotuning), and the kernels kept per row (the longest; the total counts all).
PROFILE_ITERS = 3
PROFILE_WARMUP = 2
PROFILE_TOP = 12
# Kernel names are kept to this length: CUTLASS template names run to thousands of characters.
MAX_NAME_CHARS = 120


@dataclass(frozen=True)
class Row:
    """One implementation of the grid: ``builder`` an ``implementations`` builder name (or the
    op), ``backend`` the ``FASTPEFT_BACKEND`` forced around each step (fastpeft rows)."""

    name: str
    description: str
    builder: str
    backend: str | None = None
    # An environment variable set around each step, and the fewest rows M a cell needs to be
    # timed (below it the row would run what another row runs).
    env: tuple[str, str] | None = None
    min_m: int = 0


ROWS: tuple[Row, ...] = (
    Row(LINEAR, "F.linear(x, W, b): the floor", BASE),
    Row(FUSED, "fastpeft.ops.lora_linear, FASTPEFT_BACKEND=triton: fused Triton kernels", "op", "triton"),
    # The opt-in sm_90 TMA + persistent forward (lora_fwd_tma_kernel), timed beside the fused
    # row so that the first GPU run measures it; it replaces the fused forward's GEMM only on
    # the large-M tiles, and only on sm_90 (default_config leaves the row out elsewhere).
    Row(FUSED_TMA, f"fastpeft.ops.lora_linear, FASTPEFT_BACKEND=triton, {TMA_ENV}=1: the fused kernels with the "
        "opt-in sm_90 TMA + persistent forward GEMM", "op", "triton", (TMA_ENV, "1"), MEDIUM_MAX_M + 1),
    Row(HYBRID, "fastpeft.ops.lora_linear, FASTPEFT_BACKEND=hybrid: cuBLAS base GEMM + Triton LoRA term",
        "op", "hybrid"),
    Row(TORCH, "fastpeft.ops.lora_linear, FASTPEFT_BACKEND=torch: torch composite path", "op", "torch"),
    Row(PEFT, "HF PEFT lora.Linear", PEFT),
    Row(COMPILE, "torch.compile(dynamic=True) of PEFT's formula (lora_linear_ref)", COMPILE),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


@dataclass(frozen=True)
class OpFocus:
    """The cells of one other op the focused benchmark times: its spec's ``rows`` on ``cases``."""

    name: str
    spec: OpSpec
    cases: tuple
    rows: tuple[str, ...]


def _all_rows(spec: OpSpec) -> tuple[str, ...]:
    return tuple(r.name for r in spec.rows)


# Why an other op's cell was timed eagerly (``time_op``).
NOT_CAPTURABLE_NOTE = "not capturable: reads device data on the host"
EAGER_NOTE = "timed eagerly, as the rows of this op that cannot be captured (ratios compare like with like)"
# The key shapes of the other ops: their targets' cells. Bottleneck: decode and a training batch
# at Llama width, bottleneck 64 (both modes); multi-LoRA: 64 distinct adapters at decode T = 1
# and 64 (r 16, and mixed ranks at 64) and a zipf prefill (T = 4096).
OP_FOCUS = (
    OpFocus(BOTTLENECK, bottleneck.SPEC, bottleneck.grid((1, 8192), (4096,), (64,)), _all_rows(bottleneck.SPEC)),
    OpFocus(MULTI_LORA, multi_lora.SPEC, (
        multi_lora.MultiLoRACase(1, 4096, multi_lora.RANK, 64, multi_lora.DISTINCT),
        multi_lora.MultiLoRACase(64, 4096, multi_lora.RANK, 64, multi_lora.DISTINCT),
        multi_lora.MultiLoRACase(64, 4096, multi_lora.MIXED, 64, multi_lora.DISTINCT),
        multi_lora.MultiLoRACase(4096, 4096, multi_lora.RANK, 64, multi_lora.ZIPF),
    ), _all_rows(multi_lora.SPEC)),
    # QLoRA (NF4 with double quantization, Llama width, r 16): its targets' cells, decode against
    # the quantized layer alone and a training batch against PEFT's QLoRA layer.
    OpFocus(QLORA, qlora.SPEC, qlora.grid((1, 4096), 4096, (16,), (qlora.NF4_DQ,)), _all_rows(qlora.SPEC)),
    # DoRA (Llama width, r 16): its targets' cells, inference against fastpeft's LoRA layer (decode
    # and M = 4096) and a training batch against PEFT's DoRA layer, with and without dropout.
    OpFocus(DORA, dora.SPEC, dora.grid((1, 4096), 4096, (16,), (0.0, 0.05)), _all_rows(dora.SPEC)),
)
# The rehearsal's: the same code on CPU-sized cases, less torch.compile (its CPU compilations
# would take the whole budget; the LoRA rows exercise the compile row's timing path).
TINY_OP_FOCUS = (
    OpFocus(BOTTLENECK, bottleneck.SPEC, bottleneck.grid((1, 64), (64,), (16,)),
            tuple(r for r in _all_rows(bottleneck.SPEC) if r != bottleneck.COMPILE)),
    OpFocus(MULTI_LORA, multi_lora.SPEC, (multi_lora.MultiLoRACase(16, 64, multi_lora.MIXED, 8, multi_lora.ZIPF),),
            _all_rows(multi_lora.SPEC)),
    OpFocus(QLORA, qlora.SPEC, qlora.grid((16,), 64, (8,), (qlora.NF4_DQ,)), _all_rows(qlora.SPEC)),
    OpFocus(DORA, dora.SPEC, dora.grid((16,), 64, (8,), (0.0, 0.05)), _all_rows(dora.SPEC)),
)
# 14 bottleneck cells, then 28 multi-LoRA cells (PEFT's layer with 64 adapters built once per
# input set, eager decode cells ~1 ms), 16 QLoRA cells (eager; a 4096 x 4096 NF4 layer
# quantized per input set), 30 DoRA cells (eager 4096 x 4096 layers, ~10 s), then
# torch.compile's 4 bottleneck cells (its compiles: ~10 s a graph) in about 85 s (estimate);
# the LoRA grid keeps the rest of the 3 minutes.
GPU_OPS_BUDGET_S = 85.0
TINY_OPS_BUDGET_S = 30.0


@dataclass(frozen=True)
class FocusedConfig:
    """The grid, the rows, the device, the timing and the budget of one run."""

    shapes: tuple[LayerShape, ...]
    ms: tuple[int, ...]
    rank: int
    dtype: torch.dtype
    adapter_dtypes: tuple[torch.dtype, ...]
    rows: tuple[str, ...]
    device: torch.device
    timing: TimingBudget
    budget_s: float
    profile_m: int
    seed: int = 0
    ops: tuple[OpFocus, ...] = ()
    ops_budget_s: float = 0.0


# The shapes (q/o, gate/up, down of Llama-3-8B; k/v is the q/o kernel on a narrower N),
# decode (16), a prefill chunk (512), training batches (4096, 16384), and its rank.
GPU_SHAPES = tuple(SHAPES_BY_NAME[name] for name in ("q/o", "gate/up", "down"))
GPU_MS = (16, 512, 4096, 16384)
RANK = 16
# About 3 minutes, so that the GPU script's tests, this and the grid fit its 8 minutes.
GPU_BUDGET_S = 180.0
# The profiled M: a training batch, large enough that every kernel is compute- or
# bandwidth-bound rather than launch-bound.
GPU_PROFILE_M = 4096
# The CPU rehearsal: the same shape names at 1/64 of the sizes (gate/up keeps its 3.5x
# aspect), two Ms, a one-minute budget (torch.compile's C++ compiles take most of it).
TINY_SCALE = 64
TINY_SHAPES = tuple(
    LayerShape(s.name, s.in_features // TINY_SCALE, s.out_features // TINY_SCALE) for s in GPU_SHAPES
)
TINY_MS = (16, 64)
TINY_BUDGET_S = 60.0


def default_config(device: torch.device, tiny: bool, budget_s: float | None = None, seed: int = 0) -> FocusedConfig:
    """The GPU grid, or with ``tiny`` the CPU rehearsal's; ``budget_s`` overrides the budget."""
    return FocusedConfig(
        shapes=TINY_SHAPES if tiny else GPU_SHAPES,
        ms=TINY_MS if tiny else GPU_MS,
        rank=RANK,
        dtype=torch.bfloat16,
        adapter_dtypes=(torch.float32, torch.bfloat16),
        rows=tuple(row.name for row in ROWS if row.name != FUSED_TMA or (not tiny and _has_tma(device))),
        device=device,
        timing=QUICK_BUDGET if tiny else GPU_ROUNDS_BUDGET,
        budget_s=budget_s if budget_s is not None else TINY_BUDGET_S if tiny else GPU_BUDGET_S,
        profile_m=TINY_MS[-1] if tiny else GPU_PROFILE_M,
        seed=seed,
        ops=TINY_OP_FOCUS if tiny else OP_FOCUS,
        ops_budget_s=TINY_OPS_BUDGET_S if tiny else GPU_OPS_BUDGET_S,
    )


def _has_tma(device: torch.device) -> bool:
    """Whether ``device`` runs the TMA forward (a CUDA device of compute capability 9.x)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of ``dtype`` without the prefix: ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def unavailable_reason(row: Row) -> str | None:
    """Why ``row`` cannot run in this installation (None when it can): PEFT not installed."""
    if row.builder == PEFT and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    return None


def path_taken(row: Row, device: torch.device) -> str:
    """What a row runs on ``device``: itself, except a kernel row (fused, hybrid) that the op
    sends to the torch path there (CPU tensors without Triton's interpreter), and the
    fused-tma row before sm_90, where its plan runs the fused kernels."""
    if row.backend in (None, TORCH):
        return row.name
    with forced_backend(row.backend):
        if not backend.use_triton(device):
            return "torch path"
    return FUSED if row.name == FUSED_TMA and device_info(device)[1] < 90 else row.name


# --- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSet:
    """One set of distinct tensors for a cell: weights, x ``[M, K]`` (requires grad), dy ``[M, N]``."""

    weights: LoRAWeights
    x: torch.Tensor
    dy: torch.Tensor

    @property
    def nbytes(self) -> int:
        w = self.weights
        return sum(t.nbytes for t in (w.weight, w.bias, w.lora_a, w.lora_b, self.x, self.dy))


def cache_bytes(device: torch.device) -> int:
    """The L2 size of a CUDA device; 0 on CPU (the rehearsal cycles ``MIN_ROTATION`` sets)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).L2_cache_size


def rotation_count(set_bytes: int, cache: int) -> int:
    """Sets to cycle so that the others hold ``ROTATION_CACHE_FACTOR`` x ``cache`` bytes between
    two uses of one set, within ``[MIN_ROTATION, MAX_ROTATION]``."""
    needed = 1 + math.ceil(ROTATION_CACHE_FACTOR * cache / set_bytes)
    return min(max(needed, MIN_ROTATION), MAX_ROTATION)


def make_input_sets(case: BenchCase, config: FocusedConfig, adapter_dtype: torch.dtype,
                    generator: torch.Generator) -> list[InputSet]:
    """``rotation_count`` sets of random inputs for ``case`` (the first one sized the rest)."""

    def one() -> InputSet:
        w = random_weights(case.shape, case.r, config.dtype, config.device, generator, lora_dtype=adapter_dtype)
        x = torch.randn(case.m, case.shape.in_features, generator=generator, device=config.device)
        dy = torch.randn(case.m, case.shape.out_features, generator=generator, device=config.device)
        return InputSet(w, x.to(config.dtype).requires_grad_(), dy.to(config.dtype))

    first = one()
    return [first] + [one() for _ in range(rotation_count(first.nbytes, cache_bytes(config.device)) - 1)]


def build_row(row: Row, w: LoRAWeights, training: bool) -> Implementation:
    """``row``'s implementation on weights ``w`` (dropout ``DROPOUT`` when ``training``)."""
    if row.builder == "op":
        return build_fastpeft_op(w, DROPOUT, training)
    return build_implementation(row.builder, w, DROPOUT, training)


def row_steps(row: Row, sets: Sequence[InputSet], mode: str) -> list[Callable[[], object]]:
    """One zero-argument step per input set: ``mode``'s work of ``row``, under its backend."""
    steps = []
    for s in sets:
        step = make_step(build_row(row, s.weights, training=mode == FORWARD_BACKWARD), s.x, s.dy, mode)

        def under_backend(step: Callable[[], object] = step) -> object:
            with forced_backend(row.backend), forced_env(*row.env) if row.env else contextlib.nullcontext():
                return step()

        steps.append(under_backend)
    return steps


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (adapter dtype, case, mode, row) of the grid and what became of it."""

    adapter_dtype: torch.dtype
    case: BenchCase
    mode: str
    row: str
    status: str = SKIPPED
    runs: str | None = None
    ms: Spread | None = None
    reps: int = 0
    rotation: int = 0
    method: str | None = None
    note: str | None = None
    error: str | None = None

    @property
    def key(self) -> tuple:
        return (self.adapter_dtype, self.case, self.mode)


@dataclass
class FocusedRun:
    """Everything a run produced; ``to_json`` is the file."""

    config: FocusedConfig
    settings: dict[str, Any]
    cells: list[Cell]
    profile: dict[str, Any]
    interrupted: bool = False
    complete: bool = False
    elapsed_s: float = 0.0
    ops: dict[str, OpRun] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "elapsed_s": round(self.elapsed_s, 1),
            "settings": self.settings,
            "timings": [_cell_json(c, self.cells) for c in self.cells],
            "fastest": fastest(self.cells),
            "profile": self.profile,
            "ops": {name: op_json(analyze_op(op)) for name, op in self.ops.items()},
        }


def plan_cells(config: FocusedConfig) -> list[Cell]:
    """Every cell of the grid, in the order they run."""
    return [
        Cell(adapter_dtype, BenchCase(shape, m, config.rank), mode, row)
        for adapter_dtype in config.adapter_dtypes
        for shape in config.shapes
        for m in config.ms
        for mode in MODES
        for row in config.rows
        if m >= ROWS_BY_NAME[row].min_m
    ]


def settings(config: FocusedConfig) -> dict[str, Any]:
    """The run's settings as plain data (environment, dtypes, rows, grid, timing, budget)."""
    arch = None
    if config.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(config.device)
        arch = f"sm_{major}{minor}"
    return {
        **describe_environment(config.device),
        "fastpeft_path": "forced per row (rows)",
        "arch": arch,
        "dtype": dtype_name(config.dtype),
        "adapter_dtypes": [dtype_name(d) for d in config.adapter_dtypes],
        "rank": config.rank,
        "dropout_fwd_bwd": DROPOUT,
        "modes": {FORWARD: "inference: no_grad, dropout off",
                  FORWARD_BACKWARD: f"training: dropout {DROPOUT}, grads of x, A, B (linear: x only; W frozen)"},
        "rows": {name: ROWS_BY_NAME[name].description for name in config.rows},
        "grid": {"shapes": {s.name: [s.in_features, s.out_features] for s in config.shapes}, "m": list(config.ms)},
        "timing": {
            "method": "median over CUDA-graph replays (CPU: perf_counter rounds) of one round of calls, "
                      "one call per rotated input set, divided by the rotation",
            "rotation": f"distinct (x, dy, W, b, A, B) sets cycled so that >= {ROTATION_CACHE_FACTOR}x the L2 "
                        f"({cache_bytes(config.device)} bytes) lies between two uses of one set; "
                        f"{MIN_ROTATION} to {MAX_ROTATION} sets",
            **dataclasses.asdict(config.timing),
        },
        "budget_s": config.budget_s,
        "profile": {"m": config.profile_m, "iters": PROFILE_ITERS, "top": PROFILE_TOP},
    }


def _time_group(cells: Sequence[Cell], case: BenchCase, adapter_dtype: torch.dtype, config: FocusedConfig,
                generator: torch.Generator, deadline: float) -> None:
    """Time ``cells`` (one adapter dtype and case, both modes) on shared rotated inputs; the
    cells reached after ``deadline`` stay skipped."""
    try:
        sets = make_input_sets(case, config, adapter_dtype, generator)
    except Exception as exc:  # e.g. out of memory: this group's cells failed, the next may fit
        for cell in cells:
            cell.status, cell.error = ERROR, f"making the inputs: {describe_error(exc)}"
        return
    for cell in cells:
        if time.monotonic() > deadline:
            break
        row = ROWS_BY_NAME[cell.row]
        cell.rotation = len(sets)
        try:
            cell.runs = path_taken(row, config.device)
            samples, cell.method, cell.note = time_rounds(row_steps(row, sets, cell.mode), config.device,
                                                          config.timing)
            cell.ms, cell.reps, cell.status = Spread.of_samples(samples), len(samples), OK
        except Exception as exc:  # one broken row must not stop the others
            cell.status, cell.error = ERROR, describe_error(exc)
    del sets
    _release(config.device)


def _time_groups(groups: dict[tuple, list[Cell]], compiling: bool, config: FocusedConfig,
                 generator: torch.Generator, deadline: float, start: float, log: Callable[[str], None],
                 save: Callable[[], None]) -> None:
    """Time the cells of the compile row (``compiling``) or of the other rows, group by group
    (adapter dtype, case) until ``deadline``; the JSON is saved after each group."""
    for index, ((adapter_dtype, case), group) in enumerate(groups.items(), 1):
        cells = [c for c in group if (c.row == COMPILE) == compiling]
        if not cells:
            continue
        if time.monotonic() > deadline:
            break
        log(f"[{index}/{len(groups)}{' compile' if compiling else ''}] {dtype_name(adapter_dtype)} adapters, "
            f"{case.label}  ({time.monotonic() - start:.0f} s)")
        _time_group(cells, case, adapter_dtype, config, generator, deadline)
        for cell in cells:
            if cell.status == ERROR:
                log(f"  {cell.mode} {cell.row} failed: {cell.error}")
        save()


def run_focused(config: FocusedConfig, json_path: Path | None = None,
                log: Callable[[str], None] = log_to_stderr) -> FocusedRun:
    """Profile, then time the cells of ``config`` in order until its budget runs out; the JSON
    is (re)written to ``json_path`` after the profile and after every group of cells.

    torch.compile runs without duck sizing: sizes that happen to be equal (M == r at M = 16,
    N == K for q/o) would otherwise each specialize a graph, and every compilation costs
    seconds of the budget."""
    start = time.monotonic()
    deadline = start + config.budget_s
    run = FocusedRun(config, settings(config), plan_cells(config), {"error": "not run: interrupted"},
                     ops=plan_ops(config))
    for cell in run.cells:
        reason = unavailable_reason(ROWS_BY_NAME[cell.row])
        if reason is not None:
            cell.status, cell.error = UNAVAILABLE, reason

    def save() -> None:
        run.elapsed_s = time.monotonic() - start
        if json_path is not None:
            write_json(run, json_path)

    generator = torch.Generator(config.device).manual_seed(config.seed)
    groups: dict[tuple, list[Cell]] = {}
    for cell in run.cells:
        if cell.status == SKIPPED:
            groups.setdefault((cell.adapter_dtype, cell.case), []).append(cell)
    try:
        with fx_config.patch(use_duck_shape=False):
            # 1. the LoRA grid without torch.compile, leaving the other ops their budget
            _time_groups(groups, False, config, generator, deadline - config.ops_budget_s, start, log, save)
            # 2. the other ops without their compiling rows
            ops_deadline = min(deadline, time.monotonic() + config.ops_budget_s)
            for focus in config.ops:
                time_op(focus, run.ops[focus.name], config, generator, ops_deadline, log, compiling=False)
                save()
            # 3. the profile
            try:
                run.profile = profile_rows(config, generator, log, deadline)
            except Exception as exc:  # the compiling rows can still run
                run.profile = {"error": describe_error(exc)}
            save()
            # 4. torch.compile's rows last: their compilations must not crowd the other rows out
            _time_groups(groups, True, config, generator, deadline, start, log, save)
            for focus in config.ops:
                time_op(focus, run.ops[focus.name], config, generator, deadline, log, compiling=True)
                save()
    except KeyboardInterrupt:
        run.interrupted = True
        log("interrupted: writing the cells measured so far")
    for cell in run.cells:
        if cell.status == SKIPPED:
            cell.error = "interrupted" if run.interrupted else "time budget"
    for op in run.ops.values():
        op.interrupted = run.interrupted
        for timing in op.timings:
            if timing.status == SKIPPED and timing.error is None:
                timing.error = "interrupted" if run.interrupted else "time budget"
    run.complete = not run.interrupted
    with sigint_ignored():  # the results are in: a time limit's SIGINT must not cut their writing
        save()
    return run


def plan_ops(config: FocusedConfig) -> dict[str, OpRun]:
    """An empty run per other op: its cells planned (rows unavailable here skipped with the
    reason), its settings (environment, dtype, bandwidth peak, timing)."""
    return {
        focus.name: OpRun(focus.spec, {
            **describe_environment(config.device), **GRIDS[focus.name].settings(config.device, config.dtype),
            "timing": "median over CUDA-graph replays (eager CUDA events for every row of an op one of whose "
                      "rows is not capturable; CPU: perf_counter rounds) of one round over rotated input sets, "
                      "divided by the rotation",
            **dataclasses.asdict(config.timing),
        }, plan(focus.spec, focus.cases, focus.rows, config.device))
        for focus in config.ops
    }


def time_op(focus: OpFocus, run: OpRun, config: FocusedConfig, generator: torch.Generator, deadline: float,
            log: Callable[[str], None], compiling: bool = False) -> None:
    """Time ``run``'s available cells of the rows that compile (``compiling``) or of the others,
    case by case on rotated input sets (``time_rounds``); the cells reached after ``deadline``
    stay skipped. Every row of ``focus`` is timed the same way, so that their ratios compare
    like with like: in CUDA graphs, or eagerly when one of them cannot be captured (it reads
    device data on the host: PEFT's mixed batch, the per-adapter loop)."""
    capture = all(focus.spec.row(name).capturable for name in focus.rows)
    for case in focus.cases:
        cells = [c for c in run.timings if c.case == case and c.status == SKIPPED and c.error is None
                 and focus.spec.row(c.row).compiles == compiling]
        if not cells or time.monotonic() > deadline:
            continue
        log(f"[{focus.name}] {case.label}")
        try:
            first = focus.spec.make_problem(case, config.dtype, config.device, generator)
            count = rotation_count(first.nbytes, cache_bytes(config.device))
            sets = [first] + [focus.spec.make_problem(case, config.dtype, config.device, generator)
                              for _ in range(count - 1)]
        except Exception as exc:  # e.g. out of memory: this case's cells failed, the next may fit
            for cell in cells:
                cell.status, cell.error = OP_ERROR, f"making the inputs: {describe_error(exc)}"
            continue
        for cell in cells:
            if time.monotonic() > deadline:
                break
            row = focus.spec.row(cell.row)
            try:
                steps = [row.build(problem, cell.mode) for problem in sets]
                samples, cell.method, cell.note = time_rounds(steps, config.device, config.timing, capture)
                if not capture:
                    cell.note = EAGER_NOTE if row.capturable else NOT_CAPTURABLE_NOTE
                cell.ms, cell.reps, cell.status = Spread.of_samples(samples), len(samples), OP_OK
            except Exception as exc:  # one broken row must not stop the others
                cell.status, cell.error = OP_ERROR, describe_error(exc)
                log(f"  {cell.mode} {cell.row} failed: {cell.error}")
        del sets, first
        _release(config.device)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in the block, the previous handler back after it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _release(device: torch.device) -> None:
    """Give the cached memory of a group back before the next one's (larger) inputs."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- derived data -----------------------------------------------------------------------------


def _time_of(cells: Sequence[Cell], key: tuple, row: str) -> Spread | None:
    for cell in cells:
        if cell.key == key and cell.row == row and cell.status == OK:
            return cell.ms
    return None


def _cell_json(cell: Cell, cells: Sequence[Cell]) -> dict[str, Any]:
    case = cell.case
    flops = lora_flops(case.m, case.shape.out_features, case.shape.in_features,
                       0 if cell.row == LINEAR else case.r, cell.mode)
    linear, peft = _time_of(cells, cell.key, LINEAR), _time_of(cells, cell.key, PEFT)
    return {
        "shape": case.shape.name, "m": case.m, "n": case.shape.out_features, "k": case.shape.in_features,
        "r": case.r, "adapter_dtype": dtype_name(cell.adapter_dtype), "mode": cell.mode, "impl": cell.row,
        "status": cell.status, "runs": cell.runs, "ms": spread_json(cell.ms), "reps": cell.reps,
        "rotation": cell.rotation, "method": cell.method, "note": cell.note,
        "tflops": None if cell.ms is None else flops / (cell.ms.value * 1e-3) / 1e12,
        "ratio_to_linear": spread_json(Spread.point(1.0) if cell.row == LINEAR and cell.ms else ratio(cell.ms, linear)),
        "ratio_to_peft": spread_json(Spread.point(1.0) if cell.row == PEFT and cell.ms else ratio(cell.ms, peft)),
        "error": cell.error,
    }


def fastest(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per (adapter dtype, case, mode) with a measured LoRA row: the fastest LoRA row, the
    fastest fastpeft row and its time, and whether its range lies below every other
    fastpeft row's (``clear``)."""
    out = []
    for key in dict.fromkeys(c.key for c in cells):
        measured = [c for c in cells if c.key == key and c.status == OK and c.row != LINEAR]
        if not measured:
            continue
        ours = [c for c in measured if c.row in FASTPEFT_ROWS]
        best_ours = min(ours, key=lambda c: c.ms.value) if ours else None
        adapter_dtype, case, mode = key
        out.append({
            "shape": case.shape.name, "m": case.m, "n": case.shape.out_features, "k": case.shape.in_features,
            "adapter_dtype": dtype_name(adapter_dtype), "mode": mode,
            "overall": min(measured, key=lambda c: c.ms.value).row,
            "fastpeft": None if best_ours is None else best_ours.row,
            "fastpeft_ms": None if best_ours is None else spread_json(best_ours.ms),
            "clear": best_ours is not None and all(best_ours.ms.high < c.ms.low for c in ours if c is not best_ours),
        })
    return out


def write_json(run: FocusedRun, path: Path) -> None:
    """Write the run's JSON through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run.to_json(), indent=1) + "\n")
    tmp.replace(path)


def dispatch_input(data: dict[str, Any], adapter_dtype: torch.dtype = DISPATCH_ADAPTER_DTYPE) -> dict[str, Any]:
    """The focused JSON with the timings of one adapter dtype only: what
    ``python -m fastpeft.kernels.lora.dispatch --from-bench`` reads (it keys rows on rank)."""
    name = dtype_name(adapter_dtype)
    return {**data, "timings": [t for t in data["timings"] if t["adapter_dtype"] == name]}


# --- profile ----------------------------------------------------------------------------------


def profile_rows(config: FocusedConfig, generator: torch.Generator, log: Callable[[str], None],
                 deadline: float) -> dict[str, Any]:
    """``torch.profiler`` of one forward+backward per available row at ``config.profile_m`` rows
    of the first shape, fp32 adapters (the first adapter dtype): kernels and device times per
    call on CUDA, ops and CPU times on CPU. Rows reached after ``deadline`` are not profiled
    (their error says "time budget")."""
    shape, adapter_dtype = config.shapes[0], config.adapter_dtypes[0]
    case = BenchCase(shape, config.profile_m, config.rank)
    on_cuda = config.device.type == "cuda"
    out: dict[str, Any] = {
        "shape": shape.name, "m": case.m, "n": shape.out_features, "k": shape.in_features,
        "adapter_dtype": dtype_name(adapter_dtype), "mode": FORWARD_BACKWARD, "iters": PROFILE_ITERS,
        "times": "device (CUDA kernels), us per call" if on_cuda else "CPU (self time of each op), us per call",
        "impls": {},
    }
    log(f"[profile] {dtype_name(adapter_dtype)} adapters, {case.label}, {FORWARD_BACKWARD}")
    sets = make_input_sets(case, config, adapter_dtype, generator)[:1]
    for name in config.rows:
        row = ROWS_BY_NAME[name]
        reason = unavailable_reason(row) or ("time budget" if time.monotonic() > deadline else None)
        if reason is not None:
            out["impls"][name] = {"total_us": None, "kernels": [], "error": reason}
            continue
        try:
            out["impls"][name] = _profile_step(row_steps(row, sets, FORWARD_BACKWARD)[0], on_cuda)
        except Exception as exc:  # one broken row must not stop the others
            out["impls"][name] = {"total_us": None, "kernels": [], "error": describe_error(exc)}
    del sets
    _release(config.device)
    return out


def _profile_step(step: Callable[[], object], on_cuda: bool) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(PROFILE_WARMUP):
        step()
    if on_cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_ITERS):
            step()
        if on_cuda:
            torch.cuda.synchronize()
    entries = []
    for event in prof.key_averages():
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            entries.append({"name": event.key[:MAX_NAME_CHARS], "calls": event.count / PROFILE_ITERS,
                            "us": us / PROFILE_ITERS})
    entries.sort(key=lambda e: e["us"], reverse=True)
    return {"total_us": sum(e["us"] for e in entries), "kernels": entries[:PROFILE_TOP], "error": None}


# --- report -----------------------------------------------------------------------------------


def _ratio_text(timing: dict[str, Any] | None) -> str:
    if timing is None or timing["status"] == UNAVAILABLE:
        return "n/a"
    return "-" if timing["ratio_to_linear"] is None else f"{timing['ratio_to_linear']['value']:.2f}"


def ratios_table(data: dict[str, Any]) -> list[str]:
    """The focused JSON as aligned text lines, one per measured (adapter dtype, mode, shape, M):
    F.linear's ms, each LoRA row's time over it ("n/a": unavailable, "-": not measured), the
    fastest fastpeft row ("?" when its range overlaps another's) and PEFT's time over it."""
    rows = [r for r in data["settings"]["rows"] if r != LINEAR]
    shapes, adapters = list(data["settings"]["grid"]["shapes"]), data["settings"]["adapter_dtypes"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for t in data["timings"]:
        by_key.setdefault((t["adapter_dtype"], t["mode"], t["shape"], t["m"]), {})[t["impl"]] = t
    best = {(f["adapter_dtype"], f["mode"], f["shape"], f["m"]): f for f in data["fastest"]}
    lines = [["adapter", "mode", "shape", "M", "linear ms", *(f"{r} xlin" for r in rows), "fastest", "peft/fastest"]]
    for key in sorted(by_key, key=lambda k: (adapters.index(k[0]), MODES.index(k[1]), shapes.index(k[2]), k[3])):
        timings = by_key[key]
        if not any(t["status"] == OK for t in timings.values()):
            continue
        linear, peft, win = timings.get(LINEAR), timings.get(PEFT), best.get(key)
        linear_ms = f"{linear['ms']['value']:.4g}" if linear and linear["ms"] else "-"
        winner = peft_ratio = "-"
        if win and win["fastpeft"]:
            winner = win["fastpeft"] + ("" if win["clear"] else "?")
            if peft and peft["ms"]:
                peft_ratio = f"{peft['ms']['value'] / win['fastpeft_ms']['value']:.2f}"
        lines.append([*key[:3], str(key[3]), linear_ms, *(_ratio_text(timings.get(r)) for r in rows),
                      winner, peft_ratio])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    # adapter, mode, shape left-aligned; M and the numbers right-aligned
    return ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines]


def ops_lines(data: dict[str, Any]) -> list[str]:
    """The other ops' cells in the focused JSON as text: one line per (op, case, mode) with each
    measured row's ms and ratios, then each target verdict."""
    lines = []
    for name, op in data.get("ops", {}).items():
        by_cell: dict[tuple, list[dict]] = {}
        for t in op["timings"]:
            key = tuple((k, v) for k, v in t.items() if k not in OP_TIMING_KEYS)
            by_cell.setdefault((key, t["mode"]), []).append(t)
        for (key, mode), timings in by_cell.items():
            measured = []
            for t in timings:
                if t["status"] != OP_OK:
                    continue
                ratios = "".join(f", {label} {r['value']:.3g}" for label, r in {**t["ratios"], **t["metrics"]}.items()
                                 if r is not None and not r["low"] == r["high"] == 1.0)  # not its own reference
                measured.append(f"{t['impl']} {t['ms']['value']:.4g} ms{ratios}")
            if measured:
                case = " ".join(f"{k}={v}" for k, v in key)
                lines.append(f"{name} {case} {mode}: " + "; ".join(measured))
        lines += [f"{name} target {t['target']} [{t['impl']}] "
                  + " ".join(f"{k}={t[k]}" for k in t if k not in OP_TARGET_KEYS)
                  + f": {t['value']['value']:.3g} ({t['value']['low']:.3g}-{t['value']['high']:.3g}) {t['verdict']}"
                  for t in op["targets"]]
    return lines


# The keys of an op timing / target in the JSON that are not the case's fields.
OP_TIMING_KEYS = {"mode", "impl", "status", "ms", "reps", "method", "note", "ratios", "metrics", "error"}
OP_TARGET_KEYS = {"mode", "impl", "target", "value", "verdict"}


def counts(data: dict[str, Any], field: str = "status") -> dict[str, int]:
    """Cells per value of ``field`` (status, or the timing method of the measured ones)."""
    out: dict[str, int] = {}
    for t in data["timings"]:
        if t[field] is not None:
            out[t[field]] = out.get(t[field], 0) + 1
    return out


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpeft bench --focused",
        description="Focused kernel benchmark: F.linear, fastpeft fused / hybrid / torch, PEFT and "
                    "torch.compile on Llama-3-8B shapes, bf16 activations with fp32 and bf16 adapters, "
                    "CUDA-graph timing with inputs rotated past L2, within a time budget; one JSON.",
    )
    parser.add_argument("--json", type=Path, required=True, help="the JSON to write (rewritten as the run goes)")
    parser.add_argument("--dispatch-input", type=Path,
                        help=f"also write the {dtype_name(DISPATCH_ADAPTER_DTYPE)}-adapter timings here, for "
                             "python -m fastpeft.kernels.lora.dispatch --from-bench")
    parser.add_argument("--budget-s", type=float,
                        help=f"no cell starts after this many seconds "
                             f"(default {GPU_BUDGET_S:g}, --tiny {TINY_BUDGET_S:g})")
    parser.add_argument("--tiny", action="store_true",
                        help=f"the rehearsal: shapes / {TINY_SCALE}, M in {TINY_MS}, a few calls per cell")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the focused benchmark; 0 once its JSON is written (failed, unavailable and skipped
    cells are results in it), 2 on bad arguments."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # see fastpeft.bench.__main__.main
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.budget_s is not None and args.budget_s < 0:
        parser.error("--budget-s must be >= 0")
    config = default_config(device, args.tiny, args.budget_s, args.seed)
    run = run_focused(config, args.json)
    data = run.to_json()
    print("\n".join(ratios_table(data) + ops_lines(data)))
    print(f"cells: {counts(data)}  ({run.elapsed_s:.0f} s{', interrupted' if run.interrupted else ''})")
    written = [args.json]
    if args.dispatch_input is not None:
        usable = dispatch_input(data)
        if any(t["status"] == OK and t["impl"] in FASTPEFT_ROWS for t in usable["timings"]):
            args.dispatch_input.write_text(json.dumps(usable, indent=1) + "\n")
            written.append(args.dispatch_input)
        else:
            print(f"no dispatch input: no fastpeft row measured with {dtype_name(DISPATCH_ADAPTER_DTYPE)} adapters")
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
