"""How the LoRA kernels are planned and launched (``fastpeft.kernels.lora.configs`` and
``launch``): launches on the tensors' device, no atomics (bitwise reproducible gradients),
split-K for grids that leave SMs idle, shrink splits of at least 8 K-steps, per-architecture
medium tiles, the alignment rule that keeps launches on the compiled specializations, and an
fp32 rank-r side for fp32 adapters. Kernels run in Triton's interpreter; shapes are small."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels import all_kernel_specs  # noqa: E402
from fastpeft.kernels.lora import configs as lora_configs, launch as lora_launch  # noqa: E402
from fastpeft.kernels.lora.configs import (  # noqa: E402
    aligned_for_kernels,
    gemm_tile,
    kernel_friendly,
    plan_backward,
    plan_forward,
)
from fastpeft.kernels.lora.hybrid_launch import hybrid_backward  # noqa: E402
from fastpeft.ops import lora_linear, lora_linear_ref  # noqa: E402
from tests.helpers.devices import DEVICE  # noqa: E402
from tests.helpers.fp32_adapter_overflow import (  # noqa: E402
    OVERFLOW_N,
    OVERFLOW_SCALING,
    overflowing_fp32_adapter_case,
)
from tests.helpers.launch_recorder import Recorder, launch_key, spec_key  # noqa: E402
from tests.helpers.lora_problem import SCALING, check_against_reference, make_problem  # noqa: E402
from tests.helpers.numerics import TOLERANCE, assert_close, relative_error  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")


@pytest.fixture
def every_split(monkeypatch):
    """Split every reduction the planners can split, on small shapes: one step per split
    and 32 SMs (so M = 200, N = 160, K = 192 splits the GEMMs 3 ways, the shrink and dS 2
    ways, dA and dB 4 ways)."""
    monkeypatch.setattr(lora_configs, "MIN_STEPS_PER_SPLIT", 1)
    monkeypatch.setattr(lora_configs, "INTERPRETER_SMS", 32)


def _splits(m: int, n: int, k: int, rank: int, dropout: bool) -> dict[str, int]:
    fwd = plan_forward(m, n, k, rank, dropout, DEVICE, a_bytes=4, w_bytes=4)
    bwd = plan_backward(m, n, k, rank, dropout, DEVICE)
    return {"gemm": fwd.gemm_split.count, "shrink": 1 if fwd.fuse_shrink else fwd.shrink_split.count,
            "dx": bwd.dx_split.count, "ds": bwd.ds_split.count, "da": bwd.da_split.count, "db": bwd.db_split.count}


# --- launches on the tensors' device ------------------------------------------------------


def test_every_launch_runs_inside_on_device_of_the_tensors(monkeypatch, every_split):
    """Triton launches on the current CUDA device; each launcher enters ``on_device_of`` with
    its input (x, or dY for the dY pass) before its first launch and leaves after its last."""
    entered: list[torch.Tensor] = []
    depth = [0]

    @contextlib.contextmanager
    def fake_on_device_of(tensor):
        entered.append(tensor)
        depth[0] += 1
        yield
        depth[0] -= 1

    class Checked(Recorder):
        def __getitem__(self, grid):
            assert depth[0] == 1, f"{self.fn} launched outside on_device_of"
            return self.fn[grid]

    monkeypatch.setattr(lora_launch, "on_device_of", fake_on_device_of)
    for name in dir(lora_launch):
        if name.endswith("_kernel"):
            monkeypatch.setattr(lora_launch, name, Checked(getattr(lora_launch, name), []))
    pb = make_problem((37,), 192, 160, 4, torch.float32)
    seed = torch.tensor([7], dtype=torch.int64)
    y, s = lora_launch.lora_forward(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, 0.2, seed)
    assert entered == [pb.x] and entered[0] is pb.x
    grad_y = torch.randn_like(y)
    lora_launch.lora_backward(grad_y, pb.x, pb.weight, pb.lora_a, pb.lora_b, s, SCALING, 0.2, seed, True, True, True)
    assert len(entered) == 2 and entered[1] is pb.x
    hybrid_backward(grad_y, pb.x, pb.weight, pb.lora_a, pb.lora_b, s, SCALING, 0.2, seed, True, True, True)
    assert len(entered) == 3 and entered[2] is pb.x and depth[0] == 0


# --- no atomics: reproducible gradients ---------------------------------------------------


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_split_gradients_are_bitwise_reproducible_and_compiled(monkeypatch, triton_backend, every_split, deterministic):
    """With every reduction split (fp32 partials summed in a fixed order, no atomics), two
    runs give bitwise-equal y, dX, dA and dB; and every launch of those runs is a
    configuration ``fastpeft check`` compiles (aligned K, N; fp16 as in the specs)."""
    m, k, n, r = 200, 192, 160, 8
    assert all(count > 1 for count in _splits(m, n, k, r, True).values())
    pb = make_problem((m,), k, n, r, torch.float16)
    launches: list = []
    for name in dir(lora_launch):
        if name.endswith("_kernel"):
            kernel = getattr(lora_launch, name)

            class Recording(Recorder):
                def __getitem__(self, grid, _kernel=kernel):
                    def launch(*args, **kwargs):
                        self.launches.append((self.fn, args, kwargs))
                        return _kernel[grid](*args, **kwargs)
                    return launch

            monkeypatch.setattr(lora_launch, name, Recording(kernel, launches))

    def run():
        torch.manual_seed(3)
        x, a, b = (t.detach().requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b))
        y = lora_linear(x, pb.weight, pb.bias, a, b, SCALING, 0.2, training=True)
        y.backward(torch.ones_like(y))
        return y, x.grad, a.grad, b.grad

    first, second = run(), run()
    for got, again, what in zip(first, second, ("y", "dX", "dA", "dB")):
        assert torch.equal(got, again), what
    compiled = {spec_key(s) for s in all_kernel_specs()}
    for fn, args, kwargs in launches:
        key = launch_key(fn, args, kwargs)
        assert key in compiled, f"{key} is never compiled"


# --- split-K and split reductions ---------------------------------------------------------


@pytest.mark.parametrize("m", [5, 200])  # a decode tile (16 x 32) and the medium one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_split_paths_match_reference(triton_backend, every_split, m, dtype, dropout_p):
    """Split-K forward and dX (partials, then the epilogue kernels), split shrink, dS, dA and
    dB against float64 PEFT math."""
    splits = _splits(m, 160, 192, 8, dropout_p > 0)
    assert splits["gemm"] > 1 and splits["dx"] > 1 and splits["shrink"] > 1
    check_against_reference(make_problem((m,), 192, 160, 8, dtype), dropout_p)


def test_strided_bias(triton_backend):
    """The kernels read the bias contiguously: a strided one is made contiguous first."""
    pb = make_problem((9,), 40, 24, 4, torch.float32)
    pb.bias = torch.randn(48, device=DEVICE)[::2]
    check_against_reference(pb, 0.0)


# --- planner rules ------------------------------------------------------------------------


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(lora_configs, "device_info", lambda device: (132, 90))


@pytest.mark.parametrize("m,n,k,splits", [
    (17, 4096, 4096, 4),  # 32 tiles of 64 x 128: 4 splits, 128 CTAs
    (64, 4096, 4096, 4),
    (512, 1024, 4096, 2),  # k/v projection: 64 tiles
    (1024, 1024, 4096, 4),  # 32 tiles of 128 x 256
    (16, 1024, 4096, 4),  # decode, 32 tiles of 16 x 32; 32 K-steps of 128 allow 4 splits
    (512, 4096, 4096, 1),  # 256 tiles: more than a wave already
    (100, 4096, 256, 1),  # 4 K-steps: fewer than MIN_STEPS_PER_SPLIT
])
def test_gemm_split_fills_one_wave(h100, m, n, k, splits):
    """At most one wave of CTAs (132 SMs), at least 8 K-steps per split; a split GEMM has
    only part of K, so s comes from the separate shrink."""
    plan = plan_forward(m, n, k, 16, False, CUDA, a_bytes=4, w_bytes=2)
    g = plan.gemm
    tiles = -(-m // g.block_m) * -(-n // g.block_n)
    assert plan.gemm_split.count == splits and tiles * splits <= max(132, tiles)
    if splits > 1:
        assert plan.gemm_split.length >= lora_configs.MIN_STEPS_PER_SPLIT * g.block_k and not plan.fuse_shrink


def test_dx_split_for_small_m(h100):
    """dX = dY W for M = 32 rows, K = 4096 outputs: 32 tiles; N = 1024 allows 2 splits of 8
    steps, N = 4096 the 4 that fit a wave."""
    assert plan_backward(32, 1024, 4096, 16, False, CUDA).dx_split.count == 2
    assert plan_backward(32, 4096, 4096, 16, True, CUDA).dx_split.count == 4


def test_shrink_splits_have_at_least_8_k_steps(h100):
    """M = 512 used to split K = 4096 into 32 shrink partials of one step each."""
    plan = plan_forward(512, 4096, 4096, 16, True, CUDA, a_bytes=4, w_bytes=2)
    assert not plan.fuse_shrink
    assert plan.shrink_split.count == 4 and plan.shrink_split.length == 8 * plan.shrink.block_k


@pytest.mark.parametrize("rank,a_bytes,fused", [(16, 2, True), (32, 2, True), (64, 2, True), (16, 4, True),
                                                (32, 4, True), (64, 4, False)])
def test_decode_fusion_compares_the_bytes_of_a_with_those_of_w(h100, rank, a_bytes, fused):
    """At M = 1, N = 14336 (16 x 64 tiles over bf16 W) each program re-reads all of A: fused only while
    A's bytes (rank x element) stay within its slab of W's (64 x 2): rank 64 in fp32 doubles
    them, so its shrink runs once, apart."""
    plan = plan_forward(1, 14336, 4096, rank, False, CUDA, a_bytes=a_bytes, w_bytes=2)
    assert plan.gemm.block_n == 64 and plan.fuse_shrink == fused


def test_medium_tile_per_architecture():
    """sm_90: one warpgroup (4 warps) for the 64-row tile, so wgmma is 64 x 128 (fastpeft
    check reports m64n128k16); sm_80 keeps 8 warps."""
    hopper, ampere = gemm_tile(100, 90, 4096, 132), gemm_tile(100, 80, 4096, 108)
    assert (hopper.block_m, hopper.block_n, hopper.num_warps) == (64, 128, 4)
    assert (ampere.block_m, ampere.block_n, ampere.num_warps) == (64, 128, 8)


# --- alignment: launches get the compiled specialization ------------------------------------


def test_aligned_problems_are_kernel_friendly():
    x, w = torch.randn(7, 64), torch.randn(48, 64)
    assert aligned_for_kernels(x, w)
    # Row strides that are multiples of 16 (a column slice at a 64-byte offset), one row with
    # a stray stride (never used), 3-D activations.
    assert aligned_for_kernels(torch.randn(7, 112)[:, 16:80], w)
    assert aligned_for_kernels(torch.randn(1, 64).as_strided((1, 64), (3, 1)), w)
    assert aligned_for_kernels(torch.randn(2, 9, 64), w)


@pytest.mark.parametrize("x,w", [
    (torch.randn(7, 75), torch.randn(48, 75)),  # K not a multiple of 16
    (torch.randn(7, 64), torch.randn(93, 64)),  # N not a multiple of 16
    (torch.randn(7, 100)[:, 13:77], torch.randn(48, 64)),  # row stride 100
    (torch.randn(7 * 64 + 1)[1:].view(7, 64), torch.randn(48, 64)),  # data 4 bytes past alignment
    (torch.randn(7, 128)[:, ::2], torch.randn(48, 64)),  # K stride 2
    (torch.randn(7, 64), torch.randn(64, 48).t()),  # W transposed
    (torch.empty(2**31, 64, device="meta"), torch.randn(48, 64)),  # M beyond i32
], ids=["k", "n", "x_row_stride", "x_offset", "x_k_stride", "w_transposed", "m_beyond_i32"])
def test_unaligned_problems_are_not(x, w):
    assert not aligned_for_kernels(x, w)


def test_small_operands_the_launchers_copy_when_unaligned():
    """A, B, the bias and dY are not routed on: the launchers copy them when a GPU launch
    would not get the compiled specialization (``aligned_rows``). B's row stride is the rank
    (exempt from specialization), so only its unit inner stride and alignment count."""
    assert lora_configs.aligned_rows(torch.randn(5, 64)) and not lora_configs.aligned_rows(torch.randn(64, 5).t())
    assert lora_configs.aligned_rows(torch.randn(48, 5), row_strides=False)
    assert not lora_configs.aligned_rows(torch.randn(5, 48).t(), row_strides=False)
    assert not lora_configs.aligned_rows(torch.randn(97)[1:], row_strides=False)  # a bias 4 bytes off
    assert not lora_configs.aligned_rows(torch.ones(1).expand(6, 48))  # the gradient of y.sum()


def test_kernel_friendly_only_judges_cuda_tensors():
    """The interpreter compiles nothing: CPU tensors are always friendly (tests keep odd shapes)."""
    x, w = torch.randn(7, 75), torch.randn(48, 75)
    assert kernel_friendly(x, w) and not aligned_for_kernels(x, w)


# --- fp32 rank-r side for fp32 adapters ---------------------------------------------------


def test_fp32_adapter_branch_stays_fp32_like_peft(triton_backend):
    """The kernels' version of the torch-path test (tests/ops/test_lora_linear_edge_cases.py): fp32
    adapters on an fp16 base, ``s * scaling`` far beyond fp16's range (scaling 64,
    |x| ~ 1000). The LoRA product runs on fp32 operands, so y is finite and no less accurate
    than PEFT's own layer against float64; the gradients are finite and accurate too.
    (Not bf16 here: the interpreter converts fp32 to bf16 by truncation, not rounding, which
    alone doubles the output's error; on a GPU the conversion rounds.)"""
    dtype = torch.float16
    layer, x = overflowing_fp32_adapter_case(dtype)
    base, scaling, n = layer.base_layer, OVERFLOW_SCALING, OVERFLOW_N
    weights = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    a, b = (t.detach().clone().requires_grad_() for t in weights)
    ours = lora_linear(x, base.weight, base.bias, a, b, scaling)
    with torch.no_grad():
        theirs = layer(x)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    exact = lora_linear_ref(x.double(), base.weight.double(), base.bias.double(), a64, b64, scaling)
    assert torch.isfinite(ours).all()
    our_err, peft_err = relative_error(ours, exact), relative_error(theirs, exact)
    assert our_err <= max(1.01 * peft_err, TOLERANCE[dtype] / 100), (our_err, peft_err)
    grad = torch.randn(6, n, device=DEVICE)
    ours.backward(grad.to(dtype))
    exact.backward(grad.to(dtype).double())
    assert_close(a.grad, a64.grad, dtype, "dA")
    assert_close(b.grad, b64.grad, dtype, "dB")


def test_tiny_ds_does_not_flush_to_zero(triton_backend):
    """fp16 activations, fp32 adapters, dS ~ 1e-8 (below fp16's smallest subnormal, 6e-8):
    dS stays fp32 through the dA product, so dA is as accurate as an fp32 computation (it
    was zero when dS was rounded to fp16)."""
    pb = make_problem((21,), 48, 32, 4, torch.float16, lora_dtype=torch.float32)
    pb.lora_b = pb.lora_b * 1e-9
    a = pb.lora_a.detach().requires_grad_()
    y = lora_linear(pb.x, pb.weight, pb.bias, a, pb.lora_b, SCALING)
    grad = torch.randn_like(y)
    y.backward(grad)
    ds = SCALING * grad.double() @ pb.lora_b.double()
    assert 1e-9 < ds.abs().max() < 6e-8
    a64 = a.detach().double().requires_grad_()
    exact = lora_linear_ref(pb.x.double(), pb.weight.double(), pb.bias.double(), a64, pb.lora_b.double(), SCALING)
    exact.backward(grad.double())
    assert a.grad.abs().max() > 0
    assert relative_error(a.grad, a64.grad) < 1e-5  # fp32 accuracy (tf32 on a GPU: ~1e-3)
