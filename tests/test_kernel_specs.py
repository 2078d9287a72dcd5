"""Every kernel configuration the planners can choose is among the specs that
``fastpeft check`` compiles for sm_80 / sm_90 (so a planner change cannot skip the check).

Launches are compared with bias on (the specs compile HAS_BIAS=True, a superset of the
code without it) and with contiguous operands (unit strides are constexprs in the specs).
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels import all_kernel_specs, lora_configs, lora_kernels  # noqa: E402
from fastpeft.kernels.lora_configs import block_r, plan_backward, plan_forward  # noqa: E402

# Stride arguments that contiguous operands make 1.
UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_dyn")

# (SM count, capability) of an A100 and an H100/H200.
GPUS = [(108, 80), (132, 90)]
MS = [1, 16, 17, 512, 513, 4096]
NS = [64, 1024, 4096, 14336]
RANKS = [1, 8, 16, 17, 32, 33, 64]


def _key(kernel: str, constexprs: dict, warps: int, stages: int) -> tuple:
    return (kernel, tuple(sorted((k, v) for k, v in constexprs.items() if k not in ("UPCAST", "PRECISION"))), warps, stages)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, object]:
    return {_key(s.fn.__name__, s.constexprs, s.num_warps, s.num_stages): s for s in all_kernel_specs()}


def _planned(m: int, n: int, k: int, rank: int, dropout: bool) -> list[tuple]:
    """The (kernel, constexprs, warps, stages) launches of one forward + backward."""
    r = block_r(rank)
    fwd = plan_forward(m, n, k, rank, dropout, torch.device("cuda"))
    bwd = plan_backward(m, n, k, rank, dropout, torch.device("cuda"))
    g, d, x, a = fwd.gemm, bwd.dy_pass, bwd.dx, bwd.da
    launches = [
        ("lora_fwd_kernel", {"HAS_BIAS": True, "FUSE_SHRINK": fwd.fuse_shrink, "BLOCK_M": g.block_m,
                             "BLOCK_N": g.block_n, "BLOCK_K": g.block_k, "BLOCK_R": r, "GROUP_M": lora_configs.GROUP_M},
         g),
        ("lora_bwd_dy_kernel", {"BLOCK_M": d.block_m, "BLOCK_N": d.block_n, "BLOCK_R": r}, d),
        ("lora_bwd_dx_kernel", {"HAS_DROPOUT": dropout, "BLOCK_M": x.block_m, "BLOCK_K": x.block_n,
                                "BLOCK_N": x.block_k, "BLOCK_R": r, "GROUP_M": lora_configs.GROUP_M}, x),
        ("lora_bwd_da_kernel", {"HAS_DROPOUT": dropout, "BLOCK_M": a.block_m, "BLOCK_K": a.block_n, "BLOCK_R": r}, a),
    ]
    if not fwd.fuse_shrink:
        s = fwd.shrink
        launches.append(("lora_shrink_kernel", {"HAS_DROPOUT": dropout, "BLOCK_M": s.block_m,
                                                "BLOCK_K": s.block_k, "BLOCK_R": r}, s))
    out = []
    for name, constexprs, tile in launches:
        strides = {p: 1 for p in UNIT_STRIDES if p in getattr(lora_kernels, name).arg_names}
        out.append(_key(name, {**constexprs, **strides}, tile.num_warps, tile.num_stages))
    return out


@pytest.mark.parametrize("num_sms,capability", GPUS)
def test_every_planned_launch_is_checked(compiled, monkeypatch, num_sms, capability):
    monkeypatch.setattr(lora_configs, "device_info", lambda device: (num_sms, capability))
    for m, n, k, rank, dropout in itertools.product(MS, NS, NS, RANKS, (False, True)):
        for key in _planned(m, n, k, rank, dropout):
            spec = compiled.get(key)
            assert spec is not None, f"m={m} n={n} k={k} r={rank} dropout={dropout}: {key} is never compiled"
            assert spec.runs_on(capability), f"{spec.name} is checked only for the other architecture"
