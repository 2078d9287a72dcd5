"""The ops ``fastpeft bench`` measures besides the LoRA grid, and their grids per run kind.

``--ops`` names them: ``lora`` (the LoRA linear grid: ``runner``), ``bottleneck``
(``fastpeft.bench.bottleneck``), ``multi-lora`` (``fastpeft.bench.multi_lora``), ``qlora``
(``fastpeft.bench.qlora``: rows skipped without bitsandbytes) and ``dora``
(``fastpeft.bench.dora``). The others run on the LoRA run's device, dtype (bf16 on a GPU, fp32 on CPU), timing budget and seed,
on their GPU, CPU or ``--quick`` cases. ``--quick`` leaves torch.compile out, as it does for
the LoRA grid (its compilations alone take longer than the rest of a quick run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastpeft.bench import bottleneck, dora, multi_lora, qlora
from fastpeft.bench.environment import describe_environment
from fastpeft.bench.op_bench import OpAnalysis, OpSpec, analyze_op, run_op_benchmark
from fastpeft.bench.roofline import device_peak_gb_s
from fastpeft.bench.runner import BenchConfig, log_to_stderr

LORA, BOTTLENECK, MULTI_LORA, QLORA, DORA = "lora", "bottleneck", "multi-lora", "qlora", "dora"
OPS = (LORA, BOTTLENECK, MULTI_LORA, QLORA, DORA)


@dataclass(frozen=True)
class OpGrids:
    """An op's spec, its cases per run kind and the rows a quick run leaves out."""

    spec: OpSpec
    gpu: tuple
    cpu: tuple
    quick: tuple
    not_quick: tuple[str, ...]
    settings: Callable[[torch.device, torch.dtype], dict[str, Any]]


GRIDS: dict[str, OpGrids] = {
    BOTTLENECK: OpGrids(
        bottleneck.SPEC, bottleneck.GPU_CASES, bottleneck.CPU_CASES, bottleneck.QUICK_CASES, (bottleneck.COMPILE,),
        lambda device, dtype: bottleneck.settings(device, dtype, device_peak_gb_s(device)),
    ),
    MULTI_LORA: OpGrids(
        multi_lora.SPEC, multi_lora.GPU_CASES, multi_lora.CPU_CASES, multi_lora.QUICK_CASES, (),
        lambda device, dtype: multi_lora.settings(dtype),
    ),
    QLORA: OpGrids(qlora.SPEC, qlora.GPU_CASES, qlora.CPU_CASES, qlora.QUICK_CASES, (),
                   lambda device, dtype: qlora.settings(dtype)),
    DORA: OpGrids(dora.SPEC, dora.GPU_CASES, dora.CPU_CASES, dora.QUICK_CASES, (),
                  lambda device, dtype: dora.settings(dtype)),
}


def cases_for(grids: OpGrids, config: BenchConfig, quick: bool) -> tuple:
    if quick:
        return grids.quick
    return grids.gpu if config.device.type == "cuda" else grids.cpu


def run_ops(ops: tuple[str, ...], config: BenchConfig, quick: bool,
            log: Callable[[str], None] = log_to_stderr) -> dict[str, OpAnalysis]:
    """Run every op of ``ops`` but LoRA (the caller's grid), in order; an interrupted one ends the
    run with what it measured."""
    out: dict[str, OpAnalysis] = {}
    for name in ops:
        if name == LORA:
            continue
        grids = GRIDS[name]
        rows = [r.name for r in grids.spec.rows if not (quick and r.name in grids.not_quick)]
        settings = {**describe_environment(config.device), **grids.settings(config.device, config.dtype),
                    "timing_budget": vars(config.budget), "seed": config.seed}
        run = run_op_benchmark(grids.spec, cases_for(grids, config, quick), rows, config.device, config.dtype,
                               config.budget, settings, config.seed, log)
        out[name] = analyze_op(run)
        if run.interrupted:
            break
    return out
