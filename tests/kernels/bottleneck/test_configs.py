"""The bottleneck adapter's tile planners: every tile they can return is one ``fastpeft check``
compiles (``bottleneck_kernel_specs``), the forward's D-split and the backward's row splits
cover D and M exactly, and on an H100 the forward fills the GPU at decode within its
partials' budget."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastpeft.kernels.bottleneck.configs import (
    COLUMN_MAX_RANK,
    DH_RANK_STEP,
    DH_TILE,
    DOWN_SUM_TILE,
    MAX_RANK,
    PARTIALS_SHARE,
    kernel_friendly,
    plan,
    plan_forward,
)


def _compiled_configurations() -> set[tuple]:
    from fastpeft.kernels.bottleneck.specs import bottleneck_kernel_specs

    return {(s.fn.__name__, s.constexprs["BLOCK_M"], s.constexprs.get("BLOCK_D", s.constexprs.get("BLOCK_N")),
             s.constexprs["BLOCK_R"], s.num_warps, s.num_stages) for s in bottleneck_kernel_specs()}


@pytest.mark.parametrize("sms", [4, 132])
def test_every_planned_tile_is_compiled_ahead_of_time(monkeypatch, sms):
    from fastpeft.kernels.bottleneck import configs

    monkeypatch.setattr(configs, "device_info", lambda device: (sms, 90))
    compiled = _compiled_configurations()
    for m, d, r in itertools.product((1, 16, 17, 4096, 8192), (768, 4096), (1, 16, 17, 48, 64, 100, 128, 200, 256)):
        f = plan_forward(m, d, r, 2, 4, torch.device("cpu"))
        down, up, st = f.down, f.up, DOWN_SUM_TILE
        assert ("bottleneck_down_kernel", down.block_m, down.block_d, f.down_r, down.num_warps,
                down.num_stages) in compiled
        assert ("bottleneck_up_kernel", up.block_m, up.block_d, f.up_r, up.num_warps, up.num_stages) in compiled
        assert ("bottleneck_down_sum_kernel", st.block_m, None, st.block_d, st.num_warps, st.num_stages) in compiled
        assert (f.rank_blocks - 1) * f.down_r < r <= f.rank_blocks * f.down_r
        assert f.split.length % down.block_d == 0 and (f.split.count - 1) * f.split.length < d
        assert d <= f.split.count * f.split.length
        p = plan(m, d, r, torch.device("cpu"))
        rows, cols = p.rows, p.columns
        assert ("bottleneck_bwd_dz_kernel", rows.block_m, rows.block_d, p.block_r, rows.num_warps,
                rows.num_stages) in compiled
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


@pytest.mark.parametrize("m,r", [(1, 64), (1, 256), (16, 256), (8192, 64), (8192, 256)])
def test_h100_forward_fills_the_gpu_within_the_partials_budget(monkeypatch, m, r):
    """D = 4096, bf16: at decode both projections run at least one wave of programs (a split
    over D and rank blocks; the up projection's 16-column tiles), with the split's fp32
    partials about PARTIALS_SHARE of h's and W_down's bytes (the split's ranges rounded to
    whole steps: under 1.2x); at M = 8192 64-row tiles, rank blocks of 128 and no split."""
    from fastpeft.kernels.bottleneck import configs

    monkeypatch.setattr(configs, "device_info", lambda device: (132, 90))
    d = 4096
    f = plan_forward(m, d, r, 2, 2, torch.device("cpu"))
    down_ctas = -(-m // f.down.block_m) * f.split.count * f.rank_blocks
    up_ctas = -(-m // f.up.block_m) * -(-d // f.up.block_d)
    assert up_ctas >= 132
    # At M = 8192, R = 64, 128 row tiles: a split would add more partials' traffic (4 x 2 MB,
    # written and read) than the 4 idle SMs cost.
    assert down_ctas >= 132 if m <= 16 else down_ctas == -(-m // 64) * f.rank_blocks
    assert f.split.count * m * r * 4 <= 1.2 * PARTIALS_SHARE * (m * d + r * d) * 2 or f.split.count == 1
    if m >= 8192:
        assert f.split.count == 1 and f.down.block_m == 64 and f.rank_blocks == -(-r // 128)


def test_bottlenecks_above_the_limit_are_refused_by_the_planners():
    with pytest.raises(ValueError, match=f"1 <= R <= {MAX_RANK}"):
        plan(8, 64, MAX_RANK + 1, torch.device("cpu"))
    with pytest.raises(ValueError, match=f"1 <= R <= {MAX_RANK}"):
        plan_forward(8, 64, MAX_RANK + 1, 2, 2, torch.device("cpu"))


def test_cpu_inputs_are_always_kernel_friendly():
    assert kernel_friendly(torch.randn(4, 45)[:, ::2], None)
