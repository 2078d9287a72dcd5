"""The bottleneck adapter's launchers in each of their launch structures, run in the
interpreter against float64 math (forward and every gradient): the row passes (the down
projection; dz in the backward) over one D range or split over D (partials summed by a sum
kernel), over the whole rank or rank blocks (of 64 at decode, of 128 above), 16-, 32- and
64-row tiles, up-projection tiles of every row height; each structure asserted from the plans
the launchers used (so a planner change cannot quietly drop a case); and the split passes
are bitwise reproducible."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.bottleneck import configs as bn_configs, launch as bn_launch
from fastpeft.ops import bottleneck_adapter
from tests.helpers.bottleneck_problem import check_against_reference, leaf, make_problem
from tests.helpers.devices import KERNELS_RUN

pytestmark = pytest.mark.skipif(not KERNELS_RUN, reason="needs the Triton kernels (a GPU or the interpreter)")

# (rows, D, R, SMs, partials share, expected (split?, rank blocks?, up-tile rows) of the
# forward, the same of the backward's dz pass): the SM count and the partials' budget are
# raised where the small test shapes would not split.
STRUCTURES = [
    # decode: D split, 4 rank blocks of 64, in both passes
    ((3,), 45, 200, 132, 100.0, (True, True, 16), (True, True, 16)),
    ((1,), 45, 40, 132, 100.0, (True, False, 16), (True, False, 16)),  # decode, the whole rank
    ((2, 5), 45, 64, 4, 0.0, (False, False, 16), (False, False, 16)),  # decode: one range (no budget)
    # one 64-row down tile split over D; dz: two 32-row tiles, split
    ((40,), 200, 48, 132, 100.0, (True, False, 32), (True, False, 32)),
    ((130,), 45, 17, 4, 0.25, (False, False, 64), (False, False, 32)),  # several row tiles, one range
    # the widest rank: both passes in 2 blocks of 128 (64-row down tiles, 32-row dz tiles); D odd
    ((2, 33), 37, 256, 4, 0.25, (False, True, 64), (False, True, 32)),
]


@pytest.fixture
def planned(monkeypatch):
    """Run the op on the Triton kernels and record the plans the launchers used: ``"fwd"``
    the forward's, ``"bwd"`` the backward's."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    plans = {"fwd": [], "bwd": []}
    for key, name in (("fwd", "plan_forward"), ("bwd", "plan")):
        monkeypatch.setattr(bn_launch, name, _recorded(getattr(bn_launch, name), plans[key]))
    return plans


def _recorded(planner, into: list):
    def recording(*args):
        into.append(planner(*args))
        return into[-1]

    return recording


def _structure(rp) -> tuple[bool, bool, int]:
    return rp.split.count > 1, rp.rank_blocks > 1, rp.tile.block_m


@pytest.mark.parametrize("lead,d,r,sms,share,fwd,bwd", STRUCTURES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_every_launch_structure_matches_float64(monkeypatch, planned, lead, d, r, sms, share, fwd, bwd, dropout_p):
    monkeypatch.setattr(bn_configs, "device_info", lambda device: (sms, 90))
    monkeypatch.setattr(bn_configs, "PARTIALS_SHARE", share)
    check_against_reference(make_problem(lead, d, r, torch.float16, residual=dropout_p > 0), "gelu", dropout_p)
    f, b = planned["fwd"][0], planned["bwd"][0]
    assert (*_structure(f.down)[:2], f.up.block_m) == fwd
    assert _structure(b.dz) == bwd


def test_the_split_passes_are_bitwise_reproducible(monkeypatch, planned):
    monkeypatch.setattr(bn_configs, "device_info", lambda device: (132, 90))
    monkeypatch.setattr(bn_configs, "PARTIALS_SHARE", 100.0)
    pb = make_problem((3,), 77, 200, torch.float32)

    def run() -> list[torch.Tensor]:
        leaves = [leaf(t) for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up)]
        scaling = torch.tensor(0.5, requires_grad=True)
        out = bottleneck_adapter(*leaves, "silu", scaling)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out, scaling.grad, *(t.grad for t in leaves)]

    first, second = run(), run()
    for rp in (planned["fwd"][0].down, planned["bwd"][0].dz):
        assert rp.split.count > 2 and rp.rank_blocks > 1
    assert all(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("needs", [(True, False, False, False, False, False), (False, True, False, False, False, False),
                                   (False, False, False, True, True, False), (False, False, False, False, False, True),
                                   (True, True, True, True, True, True)])
def test_the_wide_backward_forms_only_the_gradients_asked_for(monkeypatch, needs):
    """A bottleneck wider than the column kernel (R = 200: the weight-gradient GEMMs in rank
    blocks, the dh kernel, dOut's column sum) returns exactly the gradients ``needs`` asks for
    (the others None), each bitwise equal to the same gradient of a call asking for all (the
    full call's values are checked against float64 by the launch-structure tests)."""
    monkeypatch.setattr(bn_configs, "device_info", lambda device: (4, 90))
    pb = make_problem((40,), 37, 200, torch.float32, residual=False)
    h, grad_out = pb.h, torch.randn_like(pb.h)
    seed = torch.tensor([7], dtype=torch.int64)
    assert bn_configs.plan(40, 37, 200, 4, 4, h.device).wide
    _, z = bn_launch.bottleneck_forward(h, pb.w_down, pb.b_down, pb.w_up, pb.b_up, None, "silu", 0.5, 0.2, seed)

    def backward(asked):
        return bn_launch.bottleneck_backward(grad_out, h, pb.w_down, pb.w_up, pb.b_up, z, "silu", 0.5, 0.2, seed,
                                             True, asked)

    full, some = backward((True,) * 6), backward(needs)
    for name, wanted, got, want in zip(("h", "w_down", "b_down", "w_up", "b_up", "scaling"), needs, some, full):
        assert (got is not None) == wanted, name
        assert got is None or torch.equal(got, want), name
