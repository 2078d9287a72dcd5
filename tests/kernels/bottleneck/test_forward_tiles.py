"""The bottleneck adapter's forward in each of its launch structures, run in the interpreter
against float64 math: one D range or a split over D (partials summed by the sum kernel), the
whole rank or rank blocks (of 64 at decode, of 128 above), 16- and 64-row tiles, up-projection tiles of every row
height, each structure asserted from the plan the launcher used (so a planner change cannot
quietly drop a case); and the split forward is bitwise reproducible."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.bottleneck import configs as bn_configs, launch as bn_launch
from fastpeft.ops import bottleneck_adapter
from tests.helpers.bottleneck_problem import check_against_reference, make_problem
from tests.helpers.devices import KERNELS_RUN

pytestmark = pytest.mark.skipif(not KERNELS_RUN, reason="needs the Triton kernels (a GPU or the interpreter)")

# (rows, D, R, SMs, partials share, expected (split?, rank blocks?, up-tile rows)): the SM
# count and the partials' budget are raised where the small test shapes would not split.
STRUCTURES = [
    ((3,), 45, 200, 132, 100.0, (True, True, 16)),   # decode: D split, 4 rank blocks of 64
    ((1,), 45, 40, 132, 100.0, (True, False, 16)),   # decode: D split, the whole rank
    ((2, 5), 45, 64, 4, 0.0, (False, False, 16)),    # decode: one range (no budget)
    ((40,), 200, 48, 132, 100.0, (True, False, 32)),  # one 64-row tile, split over D
    ((130,), 45, 17, 4, 0.25, (False, False, 64)),   # three 64-row tiles, one range
    ((2, 33), 37, 256, 4, 0.25, (False, True, 64)),  # the widest rank: 2 blocks of 128; D odd
]


@pytest.fixture
def planned(monkeypatch):
    """Run the op on the Triton kernels and record the forward plans the launcher used."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    plans = []
    plan_forward = bn_launch.plan_forward

    def recording(*args):
        plans.append(plan_forward(*args))
        return plans[-1]

    monkeypatch.setattr(bn_launch, "plan_forward", recording)
    return plans


@pytest.mark.parametrize("lead,d,r,sms,share,expected", STRUCTURES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_every_forward_structure_matches_float64(monkeypatch, planned, lead, d, r, sms, share, expected, dropout_p):
    monkeypatch.setattr(bn_configs, "device_info", lambda device: (sms, 90))
    monkeypatch.setattr(bn_configs, "PARTIALS_SHARE", share)
    check_against_reference(make_problem(lead, d, r, torch.float16, residual=dropout_p > 0), "gelu", dropout_p)
    p = planned[0]
    assert (p.split.count > 1, p.rank_blocks > 1, p.up.block_m) == expected


def test_the_split_forward_is_bitwise_reproducible(monkeypatch, planned):
    monkeypatch.setattr(bn_configs, "device_info", lambda device: (132, 90))
    monkeypatch.setattr(bn_configs, "PARTIALS_SHARE", 100.0)
    pb = make_problem((3,), 77, 200, torch.float32)

    def run() -> torch.Tensor:
        return bottleneck_adapter(pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, "silu", 0.5)

    first, second = run(), run()
    assert planned[0].split.count > 2 and planned[0].rank_blocks > 1
    assert torch.equal(first, second)
