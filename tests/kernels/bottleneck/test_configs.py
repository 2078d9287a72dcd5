"""The bottleneck adapter's tile planner: every tile it can return is one ``fastpeft check``
compiles (``bottleneck_kernel_specs``), and the row splits of the backward's column pass cover
M exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastpeft.kernels.bottleneck.configs import (
    COLUMN_MAX_RANK,
    DH_RANK_STEP,
    DH_TILE,
    MAX_RANK,
    kernel_friendly,
    plan,
)


def _compiled_configurations() -> set[tuple]:
    from fastpeft.kernels.bottleneck.specs import bottleneck_kernel_specs

    return {(s.fn.__name__, s.constexprs["BLOCK_M"], s.constexprs["BLOCK_D"], s.constexprs["BLOCK_R"], s.num_warps,
             s.num_stages) for s in bottleneck_kernel_specs()}


@pytest.mark.parametrize("sms", [4, 132])
def test_every_planned_tile_is_compiled_ahead_of_time(monkeypatch, sms):
    from fastpeft.kernels.bottleneck import configs

    monkeypatch.setattr(configs, "device_info", lambda device: (sms, 90))
    compiled = _compiled_configurations()
    for m, d, r in itertools.product((1, 16, 17, 4096, 8192), (768, 4096), (1, 16, 17, 48, 64, 100, 128, 200, 256)):
        p = plan(m, d, r, torch.device("cpu"))
        rows, cols = p.rows, p.columns
        for fn in ("bottleneck_fwd_kernel", "bottleneck_bwd_dz_kernel"):
            assert (fn, rows.block_m, rows.block_d, p.block_r, rows.num_warps, rows.num_stages) in compiled
        assert ("bottleneck_bwd_wgrad_dh_kernel", cols.block_m, cols.block_d, p.column_r, cols.num_warps,
                cols.num_stages) in compiled
        assert p.column_r == min(p.block_r, COLUMN_MAX_RANK) and (p.rank_chunks - 1) * p.column_r < r
        assert r <= p.rank_chunks * p.column_r
        if p.rank_chunks > 1:
            t = DH_TILE
            assert ("bottleneck_bwd_dh_kernel", t.block_m, t.block_d, DH_RANK_STEP, t.num_warps,
                    t.num_stages) in compiled
        assert p.rows_per_split % cols.block_m == 0
        assert (p.splits - 1) * p.rows_per_split < m <= p.splits * p.rows_per_split


def test_bottlenecks_above_the_limit_are_refused_by_the_planner():
    with pytest.raises(ValueError, match=f"1 <= R <= {MAX_RANK}"):
        plan(8, 64, MAX_RANK + 1, torch.device("cpu"))


def test_cpu_inputs_are_always_kernel_friendly():
    assert kernel_friendly(torch.randn(4, 45)[:, ::2], None)
