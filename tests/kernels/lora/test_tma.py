"""The opt-in sm_90 forward with TMA loads and a persistent grid (``lora_fwd_tma_kernel``,
``FASTPEFT_LORA_TMA=1``), in Triton's interpreter (which runs host-side tensor descriptors,
zero padding past the edges included): against float64 on shapes that are no multiple of its
128 x 256 x 64 tile (and M below it), fp16 and bf16 (with fp32 adapters), with and without
bias and dropout; ``s`` bitwise equal to the pointer-load kernel's where both sum the same
shrink partials; outputs NaN-poisoned (conftest); two runs bitwise equal; the launcher's
fallback to ``lora_fwd_kernel`` when x or W cannot back a descriptor; and the persistent
programs' tile order against ``output_tile``'s. The interpreter's SM count is
``configs.INTERPRETER_SMS`` (4), so most shapes here give a program several tiles.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastpeft.kernels.lora import configs, launch  # noqa: E402
from fastpeft.kernels.lora.ref import lora_linear_ref  # noqa: E402
from fastpeft.kernels.tile_utils import grouped_tile, output_tile  # noqa: E402
from tests.helpers.numerics import assert_close, assert_within_bound, magnitudes  # noqa: E402

SCALING = 0.75
# (M, N, K): every dimension a partial tile of 128 x 256 x 64; 9 tiles over 4 programs; M
# below one row tile.
SHAPES = [(300, 600, 200), (5, 272, 72)]
# (activation, adapter) dtypes: PEFT's fp32 adapters on bf16, fp16 throughout.
DTYPES = [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)]


@pytest.fixture
def large_tiles(monkeypatch):
    """Every M planned on the large-M tile (so small test shapes reach the TMA forward), and a
    spy counting which forward GEMM kernel each launch runs."""
    monkeypatch.setattr(configs, "DECODE_MAX_M", 0)
    monkeypatch.setattr(configs, "MEDIUM_MAX_M", 0)
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append((self.name, grid))
            return self.kernel[grid]

    for name in ("lora_fwd_kernel", "lora_fwd_tma_kernel"):
        monkeypatch.setattr(launch, name, Spy(name, getattr(launch, name)))
    return launched


def _problem(m, n, k, r, act, lora, bias):
    x = torch.randn(m, k).to(act)
    w = (torch.randn(n, k) / math.sqrt(k)).to(act)
    b = torch.randn(n).to(act) if bias else None
    a = (torch.randn(r, k) / math.sqrt(k)).to(lora)
    bb = torch.randn(n, r).to(lora)
    return x, w, b, a, bb


def _forward(monkeypatch, tma: bool, x, w, b, a, bb, p, seed):
    monkeypatch.setenv(configs.TMA_ENV, "1" if tma else "0")
    return launch.lora_forward(x, w, b, a, bb, SCALING, p, seed)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("act,lora", DTYPES, ids=str)
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_tma_forward_matches_float64(large_tiles, monkeypatch, m, n, k, act, lora, bias, p):
    r = 16
    x, w, b, a, bb = _problem(m, n, k, r, act, lora, bias)
    seed = torch.tensor([20240607], dtype=torch.int64)
    y, s = _forward(monkeypatch, True, x, w, b, a, bb, p, seed)
    tiles = math.ceil(m / 128) * math.ceil(n / 256)
    assert large_tiles == [("lora_fwd_tma_kernel", (min(tiles, configs.INTERPRETER_SMS),))]

    mask = launch.dropout_keep_mask(seed, m, k, p) if p else None
    args = [x, w, b, a, bb]
    y64 = lora_linear_ref(*(t.double() if t is not None else None for t in args), SCALING, p, dropout_mask=mask)
    x_hat = x.double() * mask / (1 - p) if p else x.double()
    s64 = x_hat @ a.double().T
    assert_close(y, y64, act, "y")
    assert_within_bound(y, y64, magnitudes(lambda *t: lora_linear_ref(*t, SCALING, p, dropout_mask=mask), args)[0],
                        act, "y")
    assert s.dtype == torch.float32
    assert_close(s, s64, torch.float32, "s")

    y2, s2 = _forward(monkeypatch, True, x, w, b, a, bb, p, seed)
    assert torch.equal(y, y2) and torch.equal(s, s2)  # same tiles, same programs, same order

    if p:  # the pointer-load kernel sums the same shrink partials for s (never fused with dropout)
        large_tiles.clear()
        _, s_ref = _forward(monkeypatch, False, x, w, b, a, bb, p, seed)
        assert large_tiles[0][0] == "lora_fwd_kernel"
        assert torch.equal(s, s_ref)


def _unaligned_x(x):
    """x's values at an address 2 bytes past a 16-byte boundary (a view into a larger buffer)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    return view


def _padded_w(w):
    """W's values with a row stride of K + 1 elements (not a multiple of 16 bytes)."""
    buf = torch.zeros(w.shape[0], w.shape[1] + 1, dtype=w.dtype)
    buf[:, : w.shape[1]] = w
    return buf[:, : w.shape[1]]


@pytest.mark.parametrize("which", ["x base", "W row stride", "opt-out"])
def test_falls_back_when_operands_do_not_qualify(large_tiles, monkeypatch, which):
    m, n, k = 300, 600, 200
    x, w, b, a, bb = _problem(m, n, k, 16, torch.float16, torch.float16, True)
    seed = torch.empty(0, dtype=torch.int64)
    tma = which != "opt-out"
    if which == "x base":
        x = _unaligned_x(x)
    elif which == "W row stride":
        w = _padded_w(w)
    assert not (launch.tma_ready(x) and launch.tma_ready(w)) or not tma
    y, _ = _forward(monkeypatch, tma, x, w, b, a, bb, 0.0, seed)
    assert [name for name, _ in large_tiles] == ["lora_fwd_kernel"]
    y64 = lora_linear_ref(x.double(), w.double(), b.double(), a.double(), bb.double(), SCALING)
    assert_close(y, y64, torch.float16, "y")


def test_tma_ready_rules():
    x = torch.empty(8, 24, dtype=torch.float16)
    assert launch.tma_ready(x)  # 48-byte rows
    assert not launch.tma_ready(torch.empty(8, 20, dtype=torch.float16))  # 40-byte rows
    assert launch.tma_ready(torch.empty(1, 24, dtype=torch.float16)[:, :])  # one row: canonical stride
    assert not launch.tma_ready(x.t())  # inner stride 8
    assert not launch.tma_ready(_unaligned_x(x))


@pytest.mark.parametrize("capability,m,n,expected", [(90, 4096, 4096, True), (80, 4096, 4096, False),
                                                     (90, 512, 4096, False), (90, 640, 1024, False)])
def test_plan_takes_tma_only_on_the_sm90_large_tile_without_split_k(monkeypatch, capability, m, n, expected):
    """sm_90 only, the large tile only (M > MEDIUM_MAX_M), no split-K (M = 640, N = 1024 on 132
    SMs is 5 x 4 tiles: split 6 ways), and the shrink then never fused."""
    monkeypatch.setattr(configs, "device_info", lambda device: (132, capability))
    plan = configs.plan_forward(m, n, 4096, 16, False, torch.device("cuda"), a_bytes=2, w_bytes=2, tma=True)
    assert plan.tma == expected
    assert not (plan.tma and plan.fuse_shrink)
    off = configs.plan_forward(m, n, 4096, 16, False, torch.device("cuda"), a_bytes=2, w_bytes=2)
    assert not off.tma and (off.gemm, off.gemm_split) == (plan.gemm, plan.gemm_split)


@triton.jit
def _tile_order_probe(out_ptr, M, N, num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """out[tile] = (pid_m, pid_n, program): the persistent loop of ``lora_fwd_tma_kernel``."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, num_programs):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        tl.store(out_ptr + tile * 3, pid_m)
        tl.store(out_ptr + tile * 3 + 1, pid_n)
        tl.store(out_ptr + tile * 3 + 2, tl.program_id(0))


@triton.jit
def _output_tile_probe(out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """out[program] = (first row // BLOCK_M, pid_n): one program per tile (``output_tile``)."""
    rows, _, pid_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tl.store(out_ptr + tl.program_id(0) * 2, tl.min(rows, axis=0) // BLOCK_M)
    tl.store(out_ptr + tl.program_id(0) * 2 + 1, pid_n)


def test_persistent_programs_walk_output_tiles_in_grouped_order():
    """Each tile once, tile t on program t % programs, and tile t is output_tile's program t."""
    m, n, bm, bn, programs = 1000, 700, 16, 32, 5  # 63 x 22 tiles: several groups, a short last one
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    persistent = torch.full((tiles, 3), -1, dtype=torch.int32)
    _tile_order_probe[(programs,)](persistent, m, n, programs, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=configs.GROUP_M)
    one_each = torch.full((tiles, 2), -1, dtype=torch.int32)
    _output_tile_probe[(tiles,)](one_each, m, n, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=configs.GROUP_M)
    assert torch.equal(persistent[:, :2], one_each)
    assert torch.equal(persistent[:, 2], torch.arange(tiles, dtype=torch.int32) % programs)
    assert len(set(map(tuple, one_each.tolist()))) == tiles


@pytest.mark.parametrize("impl,kernel", [("fused-tma", "lora_fwd_tma_kernel"), ("fused", "lora_fwd_kernel")])
def test_the_ops_fused_tma_choice_runs_the_tma_forward(large_tiles, monkeypatch, impl, kernel):
    """A dispatch table's ``fused-tma`` (the env var off) makes the op's forward the TMA kernel
    and its backward the fused one; ``fused`` keeps the pointer-load kernel. Every output and
    gradient against float64."""
    from fastpeft.kernels.lora import dispatch
    from fastpeft.ops import lora_linear

    monkeypatch.setenv(configs.TMA_ENV, "0")
    monkeypatch.setattr(dispatch, "choose_implementation", lambda x, weight, lora_a, training, dropout=False: impl)
    x, w, b, a, bb = _problem(300, 272, 200, 16, torch.bfloat16, torch.float32, True)
    leaves = [t.requires_grad_() for t in (x, a, bb)]
    y = lora_linear(x, w, b, a, bb, SCALING, training=True)
    assert [name for name, _ in large_tiles] == [kernel]
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in leaves)
    y64 = lora_linear_ref(x64, w.double(), b.double(), a64, b64, SCALING)
    y64.backward(dy.double())
    assert_close(y, y64, torch.bfloat16, "y")
    for got, want, dtype, name in ((x.grad, x64.grad, torch.bfloat16, "dx"), (a.grad, a64.grad, torch.float32, "dA"),
                                   (bb.grad, b64.grad, torch.float32, "dB")):
        assert_close(got, want, dtype, name)
