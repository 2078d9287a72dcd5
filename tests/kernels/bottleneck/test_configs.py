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
    MAX_RANK,
    PARTIALS_SHARE,
    SUM_TILE,
    WIDE_RANK_BLOCK,
    block_r,
    kernel_friendly,
    plan,
    plan_forward,
)
from fastpeft.kernels.lora.configs import wgrad_tile


def _compiled_configurations() -> set[tuple]:
    from fastpeft.kernels.bottleneck.specs import bottleneck_kernel_specs

    return {(s.fn.__name__, s.constexprs["BLOCK_M"],
             s.constexprs.get("BLOCK_D", s.constexprs.get("BLOCK_N", s.constexprs.get("BLOCK_C"))),
             s.constexprs["BLOCK_R"], s.num_warps, s.num_stages) for s in bottleneck_kernel_specs()}


@pytest.mark.parametrize("sms", [4, 132])
def test_every_planned_tile_is_compiled_ahead_of_time(monkeypatch, sms):
    from fastpeft.kernels.bottleneck import configs

    monkeypatch.setattr(configs, "device_info", lambda device: (sms, 90))
    compiled = _compiled_configurations()
    for m, d, r in itertools.product((1, 16, 17, 4096, 8192), (768, 4096), (1, 16, 17, 48, 64, 100, 128, 200, 256)):
        f = plan_forward(m, d, r, 2, 4, torch.device("cpu"))
        p = plan(m, d, r, 2, 4, torch.device("cpu"))
        up, st = f.up, SUM_TILE
        assert ("bottleneck_up_kernel", up.block_m, up.block_d, f.up_r, up.num_warps, up.num_stages) in compiled
        for fn, rp in (("bottleneck_down_kernel", f.down), ("bottleneck_bwd_dz_kernel", p.dz)):
            t = rp.tile
            assert (fn, t.block_m, t.block_d, rp.rank_block, t.num_warps, t.num_stages) in compiled
            assert (rp.rank_blocks - 1) * rp.rank_block < r <= rp.rank_blocks * rp.rank_block
            assert rp.split.length % t.block_d == 0 and (rp.split.count - 1) * rp.split.length < d
            assert d <= rp.split.count * rp.split.length
        for fn in ("bottleneck_down_sum_kernel", "bottleneck_bwd_dz_sum_kernel"):
            assert (fn, st.block_m, None, st.block_d, st.num_warps, st.num_stages) in compiled
        assert p.wide == (block_r(r) > COLUMN_MAX_RANK)
        if p.wide:  # the weight-gradient GEMMs in rank blocks, and the dh kernel
            w, t = wgrad_tile(), DH_TILE
            assert p.column_r == WIDE_RANK_BLOCK and r > COLUMN_MAX_RANK
            assert ("lora_bwd_wgrad_kernel", w.block_m, w.block_n, p.column_r, w.num_warps, w.num_stages) in compiled
            assert ("bottleneck_bwd_dh_kernel", t.block_m, t.block_d, DH_RANK_STEP, t.num_warps,
                    t.num_stages) in compiled
            row_step = w.block_m
        else:  # the column kernel over every rank
            cols = p.columns
            assert ("bottleneck_bwd_wgrad_dh_kernel", cols.block_m, cols.block_d, p.column_r, cols.num_warps,
                    cols.num_stages) in compiled
            assert p.column_r == block_r(r) <= COLUMN_MAX_RANK
            row_step = cols.block_m
        assert p.rows.length % row_step == 0
        assert (p.rows.count - 1) * p.rows.length < m <= p.rows.count * p.rows.length


@pytest.mark.parametrize("m,r", [(1, 64), (1, 256), (16, 256), (8192, 64), (8192, 256)])
def test_h100_row_passes_fill_the_gpu_within_the_partials_budget(monkeypatch, m, r):
    """D = 4096, bf16: at decode the down projection, dz and the up projection run at least
    one wave of programs (a split over D and rank blocks; the up projection's 16-column
    tiles), with the split's fp32 partials about PARTIALS_SHARE of the pass's bytes (its
    ranges rounded to whole steps: under 1.2x); at M = 8192 64-row down tiles, rank blocks of
    128 and no split."""
    from fastpeft.kernels.bottleneck import configs

    monkeypatch.setattr(configs, "device_info", lambda device: (132, 90))
    d = 4096
    f = plan_forward(m, d, r, 2, 2, torch.device("cpu"))
    up_ctas = -(-m // f.up.block_m) * -(-d // f.up.block_d)
    assert up_ctas >= 132
    for rp in (f.down, plan(m, d, r, 2, 2, torch.device("cpu")).dz):
        ctas = -(-m // rp.tile.block_m) * rp.split.count * rp.rank_blocks
        assert ctas >= 132 or m > 16
        assert rp.split.count * m * r * 4 <= 1.2 * PARTIALS_SHARE * (m * d + r * d) * 2 or rp.split.count == 1
    if m >= 8192:
        # 128 row tiles at R = 64: a split would add more partials' traffic (4 x 2 MB,
        # written and read) than the 4 idle SMs cost.
        assert f.down.split.count == 1 and f.down.tile.block_m == 64 and f.down.rank_blocks == -(-r // 128)


def test_bottlenecks_above_the_limit_are_refused_by_the_planners():
    with pytest.raises(ValueError, match=f"1 <= R <= {MAX_RANK}"):
        plan(8, 64, MAX_RANK + 1, 2, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=f"1 <= R <= {MAX_RANK}"):
        plan_forward(8, 64, MAX_RANK + 1, 2, 2, torch.device("cpu"))


def test_cpu_inputs_are_always_kernel_friendly():
    assert kernel_friendly(torch.randn(4, 45)[:, ::2], None)
