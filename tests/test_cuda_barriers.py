"""Every barrier of the CUDA C++ kernels (each ``B::sync()`` in csrc/*.cu) is one the CPU
emulation cannot do without: run as if that one line were removed (csrc/block.h: HostShared,
through ``fastpeft._C.emulation_drop_barrier``), the launch fails, by a "missing barrier" error
(a phase overwrote shared memory an earlier phase of the same interval may still read) or by
wrong outputs (a phase read what an earlier phase of its interval wrote, which the emulation
showed it as poison).

The cases are chosen so that every loop around a barrier runs at least twice: D = 37 > 32 columns
per staging step, M = 130 rows in 2 splits of 80 rows (one SM) > 16 rows per staging step, a
learned scaling (the block reduction of its gradient); for the tensor-core forward (16-bit h),
D = 150 > 128 output columns per step and rank 48 (padded to 64) > 32 per step; and decode
ranks up to 24 > 4 rows per shrink block.
"""

from __future__ import annotations

import pytest
import torch

from fastpeft import cuda_ext
from tests.helpers.cuda_bottleneck_cases import check_case
from tests.helpers.cuda_emulation import barrier_sites, dropped_barrier, emulate_cuda_kernels
from tests.helpers.multi_lora_decode import check_decode_case

SITES = barrier_sites()


def _bottleneck():
    # m, d, r, activation, bias, separate residual, dropout_p, h dtype, weight dtype, tensor scaling, strided
    check_case("cpu", 130, 37, 48, "gelu", True, False, 0.1, torch.float32, torch.float32, True, False)
    check_case("cpu", 40, 150, 48, "silu", True, True, 0.1, torch.bfloat16, torch.bfloat16, False, False)


def _decode():
    check_decode_case(5, 64, 129, torch.float32, torch.float32)


RUNS = {"bottleneck.cu": _bottleneck, "bgmv.cu": _decode}


@pytest.fixture
def emulated(monkeypatch):
    shim = emulate_cuda_kernels(monkeypatch)
    monkeypatch.setattr(cuda_ext, "sm_count", lambda device: 1)  # few splits: several row steps each
    return shim


def test_every_source_with_barriers_has_a_run():
    assert SITES, "no B::sync() found in csrc/*.cu"
    assert {site.split(":")[0] for site in SITES} == set(RUNS)


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
def test_runs_pass_with_every_barrier(emulated, run):
    run()


@pytest.mark.parametrize("site", SITES)
def test_removing_a_barrier_fails(emulated, site):
    with dropped_barrier(site), pytest.raises((RuntimeError, AssertionError)) as failure:
        RUNS[site.split(":")[0]]()
    if failure.type is RuntimeError:
        assert "missing barrier" in str(failure.value)
    else:  # the norm-wise or the element-wise check against float64
        assert "relative error" in str(failure.value) or "magnitude bound" in str(failure.value)
