"""pytest-benchmark cases of the bottleneck adapter benchmark (the ones ``fastpeft bench --ops
bottleneck`` runs; see ``fastpeft.bench.bottleneck``).

    pytest bench/test_bench_bottleneck.py                          # timed
    pytest bench/test_bench_bottleneck.py --benchmark-disable -q   # smoke: every cell once

On CUDA: the GPU grid in bf16; on CPU: the ``--quick`` cases in fp32 without torch.compile (CI
runs this suite once per cell; ``fastpeft bench`` has the CPU grid). Rows that cannot run here
(the Triton and CUDA C++ kernels on CPU) skip with the reason. ``fastpeft bench`` is the reference
measurement (ratios, ranges, bandwidth, targets); this suite feeds pytest-benchmark's history.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastpeft.bench import bottleneck, op_runs
from fastpeft.bench.op_bench import plan
from fastpeft.bench.timing import synchronized

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
GRIDS = op_runs.GRIDS[op_runs.BOTTLENECK]
QUICK = DEVICE.type != "cuda"
CASES = GRIDS.quick if QUICK else GRIDS.gpu
ROWS = [name for name in bottleneck.ROW_NAMES if not (QUICK and name in GRIDS.not_quick)]
CELLS = plan(bottleneck.SPEC, CASES, ROWS, DEVICE)


@functools.lru_cache(maxsize=1)  # one case's tensors at a time: the cells run case by case
def problem(case: bottleneck.BottleneckCase) -> bottleneck.BottleneckProblem:
    return bottleneck.make_problem(case, DTYPE, DEVICE, torch.Generator(DEVICE).manual_seed(CASES.index(case)))


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"M{c.case.m}-D{c.case.d}-R{c.case.r}-{c.mode}-{c.row}")
def test_bottleneck_adapter(benchmark, cell) -> None:
    if cell.error is not None:
        pytest.skip(cell.error)
    benchmark.group = f"bottleneck {cell.case.label} {cell.mode}"
    element_size = torch.empty(0, dtype=DTYPE).element_size()
    benchmark.extra_info["bytes"] = bottleneck.bytes_moved(cell.case, cell.mode, element_size)
    benchmark(synchronized(bottleneck.SPEC.row(cell.row).build(problem(cell.case), cell.mode), DEVICE))
