"""pytest-benchmark cases of the multi-LoRA benchmark (the ones ``fastpeft bench --ops
multi-lora`` runs; see ``fastpeft.bench.multi_lora``).

    pytest bench/test_bench_multi_lora.py                          # timed
    pytest bench/test_bench_multi_lora.py --benchmark-disable -q   # smoke: every cell once

On CUDA: the GPU grid in bf16; on CPU: the ``--quick`` cases in fp32 (CI runs this suite once
per cell; ``fastpeft bench`` has the CPU grid). Rows that cannot run here (the Triton and CUDA
C++ kernels on CPU, PEFT when not installed) skip with the reason.
``fastpeft bench`` is the reference measurement (ratios to the base linear and PEFT, ranges,
targets); this suite feeds pytest-benchmark's history.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastpeft.bench import multi_lora
from fastpeft.bench.op_bench import plan
from fastpeft.bench.timing import synchronized

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = multi_lora.GPU_CASES if DEVICE.type == "cuda" else multi_lora.QUICK_CASES
CELLS = plan(multi_lora.SPEC, CASES, multi_lora.ROW_NAMES, DEVICE)


@functools.lru_cache(maxsize=1)  # one case's tensors at a time: the cells run case by case
def problem(case: multi_lora.MultiLoRACase) -> multi_lora.MultiLoRAProblem:
    return multi_lora.make_problem(case, DTYPE, DEVICE, torch.Generator(DEVICE).manual_seed(CASES.index(case)))


def cell_id(cell) -> str:
    c = cell.case
    return f"T{c.t}-H{c.hidden}-r{c.rank}-L{c.adapters}-{c.popularity}-{cell.row}"


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_multi_lora_linear(benchmark, cell) -> None:
    if cell.error is not None:
        pytest.skip(cell.error)
    benchmark.group = f"multi-lora {cell.case.label}"
    benchmark(synchronized(multi_lora.SPEC.row(cell.row).build(problem(cell.case), cell.mode), DEVICE))
