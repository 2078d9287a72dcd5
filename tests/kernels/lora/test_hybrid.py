"""The cuBLAS-hybrid path (FASTPEFT_BACKEND=hybrid) of the LoRA op against a float64
reference: forward and all three gradients, dropout masks equal to the fused kernels',
mixed per-pass dispatch, registration (opcheck, torch.compile), and every launch it can make
compiled by ``fastpeft check``. Kernels run in Triton's interpreter on CPU; the conftest
poisons ``launch_device.empty_output``, through which the hybrid launchers allocate their outputs."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from fastpeft.backend import interpreting  # noqa: E402
from fastpeft.kernels import launch_device  # noqa: E402
from fastpeft.kernels import all_kernel_specs  # noqa: E402
from fastpeft.kernels.dropout_mask import (
    draw_seed,  # noqa: E402
    keep_mask_philox,  # noqa: E402
)
from fastpeft.kernels.lora import configs as lora_configs  # noqa: E402
from fastpeft.kernels.lora import dispatch as lora_dispatch
from fastpeft.kernels.lora import hybrid_launch as hybrid  # noqa: E402
from fastpeft.kernels.lora import launch as lora_launch
from fastpeft.kernels.lora.specs import DTYPE_CASES  # noqa: E402
from fastpeft.ops import lora_linear_dropout_mask  # noqa: E402
from tests.helpers.devices import DEVICE, dtype_id  # noqa: E402
from tests.helpers.launch_recorder import GPUS, launch_key, record_launches, spec_key  # noqa: E402
from tests.helpers.lora_problem import SCALING, check_against_reference, make_problem  # noqa: E402
from tests.helpers.lora_registration import (  # noqa: E402
    compiled_matches_eager,
    functional_op_compiles_without_graph_breaks,
    opcheck_backward,
    opcheck_forward,
)

# Activation dtypes: fp32 runs the kernels in the interpreter only; bf16 is computed in fp32
# there (UPCAST, IEEE products): bf16 I/O, fp32 math (test id "bf16_io_fp32_math",
# tests.helpers.devices.dtype_id), so only a GPU run covers bf16 arithmetic (tests/test_gpu.py).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The kernels run on DEVICE's tensors only on a GPU or in the interpreter: elsewhere (a CPU
# run with TRITON_INTERPRET=0) the hybrid backend sends CPU tensors to the torch path.
pytestmark = pytest.mark.skipif(not (DEVICE.type == "cuda" or interpreting()),
                                reason="the hybrid kernels do not run on CPU tensors outside the interpreter")


@pytest.fixture(autouse=True)
def hybrid_backend(monkeypatch):
    """Every test here forces the hybrid path."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "hybrid")


def _spy_launches(monkeypatch) -> list[str]:
    """Record which launcher functions the op calls."""
    calls: list[str] = []
    for name in ("hybrid_forward", "hybrid_backward"):
        original = getattr(hybrid, name)

        def spy(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(hybrid, name, spy)
    return calls


def test_the_op_runs_the_hybrid_launchers(monkeypatch):
    calls = _spy_launches(monkeypatch)
    check_against_reference(make_problem((7,), 33, 21, 4, torch.float32), 0.2)
    assert calls == ["hybrid_forward", "hybrid_backward"]


# K and N odd and not multiples of any tile; M: decode, the 16-row tiles, the 64-row tiles.
@pytest.mark.parametrize("m", [1, 7, 130, 600])
@pytest.mark.parametrize("r", [1, 4, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(m, r, dtype):
    check_against_reference(make_problem((m,), 75, 93, r, dtype), 0.0)


@pytest.mark.parametrize("m", [1, 130, 600])
@pytest.mark.parametrize("r", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference_with_dropout(m, r, dtype):
    check_against_reference(make_problem((m,), 75, 93, r, dtype), 0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("m", [9, 600])
def test_fp32_lora_weights_with_16bit_activations(dtype, dropout_p, m):
    """PEFT's default: fp32 adapters on a 16-bit model; the rank-r side stays fp32."""
    check_against_reference(make_problem((m,), 70, 50, 8, dtype, lora_dtype=torch.float32), dropout_p)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_with_and_without_bias(bias, dropout_p):
    check_against_reference(make_problem((130,), 61, 47, 5, torch.float16, bias=bias), dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_3d_input(dropout_p):
    check_against_reference(make_problem((2, 9), 37, 29, 4, torch.float32), dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_non_contiguous_views(dropout_p):
    """x strided along K and along rows, a transposed base weight, transposed A and B."""
    pb = make_problem((2, 9), 74, 29, 4, torch.float32)
    pb.x = torch.randn(9, 2, 2 * 74, device=DEVICE)[..., ::2].transpose(0, 1)  # [2, 9, 74], k-stride 2
    pb.weight = pb.weight.t().contiguous().t()
    pb.lora_a = pb.lora_a.t().contiguous().t()
    pb.lora_b = pb.lora_b.t().contiguous().t()
    check_against_reference(pb, dropout_p)
    pb.x = torch.randn(11, 100, device=DEVICE)[:, 13:87]  # row stride 100, k stride 1
    check_against_reference(pb, dropout_p)
    pb.bias = torch.randn(2 * 29, device=DEVICE)[::2]  # a strided bias
    check_against_reference(pb, dropout_p)


def test_broadcast_grad_output():
    """A gradient with zero row stride, as ``y.sum()`` hands the backward (cuBLAS takes it as
    is): one random row broadcast over the rows, so that dB's rows differ."""
    pb = make_problem((6,), 40, 24, 4, torch.float32)
    check_against_reference(pb, 0.2, grad_y=torch.randn(1, 24, device=DEVICE).expand(6, 24))


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_empty_batch(lead):
    """M = 0 takes the torch path (the dispatcher's rule), with the hybrid backend forced."""
    pb = make_problem(lead, 20, 12, 4, torch.float32)
    x = pb.x.requires_grad_()
    a = pb.lora_a.requires_grad_()
    seed = draw_seed(DEVICE)
    y, s, _ = torch.ops.fastpeft.lora_linear(x, pb.weight, pb.bias, a, pb.lora_b, SCALING, 0.1, seed)
    assert y.shape == (*lead, 12) and s.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("m,k", [(1, 75), (5, 517), (130, 75), (600, 33)])
def test_dropout_mask_is_the_fused_kernels(monkeypatch, m, k):
    """The forward's ``s`` is ``x_hat A^T`` for exactly the mask ``lora_linear_dropout_mask``
    gives (the Philox bits of ``keep_mask_philox``), and equals the fused kernels' ``s``."""
    p = 0.3
    pb = make_problem((m,), k, 40, 16, torch.float32)
    seed = torch.tensor([2**40 + 7], dtype=torch.int64, device=DEVICE)
    keep = lora_linear_dropout_mask(seed, m, k, p)
    assert torch.equal(keep, keep_mask_philox(seed, m, k, p))
    args = (pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, p, seed)
    _, s_hybrid, saved = torch.ops.fastpeft.lora_linear(*args)
    assert saved.numel() == 0  # the hybrid path saves no mask
    expected = (pb.x.double() * keep / (1 - p)) @ pb.lora_a.double().t()
    torch.testing.assert_close(s_hybrid.double(), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    _, s_fused, _ = torch.ops.fastpeft.lora_linear(*args)
    torch.testing.assert_close(s_hybrid, s_fused, rtol=1e-5, atol=1e-5)


def _table(forward: str, backward: str) -> dict:
    return {"schema": lora_dispatch.SCHEMA, "entries": [
        {"mode": "inference", "implementation": forward, "measured": "unmeasured: test"},
        {"mode": "training", "implementation": backward, "measured": "unmeasured: test"},
        {"implementation": "torch", "measured": "unmeasured: test"},
    ]}


@pytest.mark.parametrize("forward,backward", [
    ("fused", "hybrid"), ("hybrid", "fused"), ("hybrid", "torch"), ("torch", "hybrid"), ("fused", "torch"),
])
def test_forward_and_backward_may_take_different_paths(monkeypatch, forward, backward):
    """A forward and a backward on different paths (the op called without ``training``: its
    forward takes the inference entry, its backward the training one): every kernel path
    saves the same fp32 s and no mask, and a torch backward after a kernel forward
    regenerates the mask from the seed."""
    monkeypatch.setattr(lora_dispatch, "backend_choice", lambda: "auto")
    monkeypatch.setattr(lora_dispatch, "shipped_table", lambda: _table(forward, backward))
    pb = make_problem((130,), 45, 37, 4, torch.float16, lora_dtype=torch.float32)
    check_against_reference(pb, 0.2)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_forward(dropout_p, dtype):
    opcheck_forward(dropout_p, dtype)


@pytest.mark.parametrize("needs", [(True, True, True), (False, False, True), (True, False, False)])
def test_opcheck_backward(needs):
    opcheck_backward(needs)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_torch_compile_fullgraph_forward_and_backward(dropout_p):
    compiled_matches_eager(dropout_p)


def test_functional_op_compiles_without_graph_breaks():
    functional_op_compiles_without_graph_breaks()


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the specs' names


def _run_on_meta(m: int, n: int, k: int, rank: int, dropout: bool, act: torch.dtype, lora: torch.dtype) -> None:
    """One forward and one full backward of the hybrid launchers, on meta tensors."""
    meta = torch.device("meta")
    x = torch.empty(m, k, dtype=act, device=meta)
    w = torch.empty(n, k, dtype=act, device=meta)
    a = torch.empty(rank, k, dtype=lora, device=meta)
    b = torch.empty(n, rank, dtype=lora, device=meta)
    seed = torch.empty(1 if dropout else 0, dtype=torch.int64, device=meta)
    p = 0.1 if dropout else 0.0
    _, s = hybrid.hybrid_forward(x, w, torch.empty(n, dtype=act, device=meta), a, b, 0.5, p, seed)
    grad_y = torch.empty(m, n, dtype=act, device=meta)
    hybrid.hybrid_backward(grad_y, x, w, a, b, s, 0.5, p, seed, True, True, True)


@pytest.mark.parametrize("act,lora", hybrid.HYBRID_DTYPE_CASES)
def test_every_hybrid_launch_is_checked(monkeypatch, act, lora):
    """Every launch the hybrid launchers make, reduced to what Triton's launcher specializes
    on (tests/helpers/launch_recorder.py, on meta tensors as on a GPU), is a spec that
    ``fastpeft check`` compiles, on the architecture that launches it: the hybrid kernels in
    every dtype case, the fused path's passes over dY and x (``lora_launch.lora_backward``)
    in the dtype cases the fused specs cover (``lora_specs.DTYPE_CASES``). Problems are
    ``kernel_friendly`` (K, N multiples of 16); M and the rank are arbitrary."""
    compiled = {spec_key(s): s for s in all_kernel_specs()}
    launches = record_launches(monkeypatch, lora_launch, hybrid)
    monkeypatch.setattr(launch_device, "interpreting", lambda: False)
    hybrid_kernels = {"lora_hybrid_fwd_kernel", "lora_hybrid_dx_kernel"}
    launched = set()
    for (num_sms, capability), m, n, k, rank, dropout in itertools.product(
            GPUS, [1, 16, 17, 512, 513, 4096], [64, 4096, 14336], [64, 4096, 14336], [1, 16, 17, 64], (False, True)):
        monkeypatch.setattr(lora_configs, "device_info", lambda device: (num_sms, capability))
        monkeypatch.setattr(hybrid, "device_info", lambda device: (num_sms, capability))
        launches.clear()
        _run_on_meta(m, n, k, rank, dropout, _DTYPES[act], _DTYPES[lora])
        for fn, args, kwargs in launches:
            key = launch_key(fn, args, kwargs)
            if key[0] not in hybrid_kernels and (act, lora) not in DTYPE_CASES:
                continue
            spec = compiled.get(key)
            assert spec is not None, f"m={m} n={n} k={k} r={rank} dropout={dropout}: {key} is never compiled"
            assert spec.runs_on(capability), f"{spec.name} is checked only for the other architecture"
            launched.add(key[0])
    # with the fused path's shrink and split-K epilogue (the expand) up to SPLIT_SHRINK_MAX_M rows
    assert hybrid_kernels | {"lora_shrink_kernel", "lora_fwd_split_epilogue_kernel"} <= launched


def test_forward_split_fills_the_gpu_within_bounds():
    """Enough programs for PROGRAMS_PER_SM per SM, never more than one per column tile or
    MAX_SPLIT_N per row tile."""
    tile = hybrid.forward_tile(4096)
    assert hybrid.forward_split(4096, 4096, tile, 132) == 5  # 64 row tiles, 264 programs wanted
    assert hybrid.forward_split(65536, 4096, tile, 132) == 1
    assert hybrid.forward_split(600, 4096, tile, 132) == hybrid.MAX_SPLIT_N
    small = hybrid.forward_tile(1)
    assert hybrid.forward_split(1, 100, small, 132) == 2  # two 64-column tiles


# The decode forward (M <= SPLIT_SHRINK_MAX_M): K-split shrink, then the write-only expand.
# K = 517 is 5 steps of the 128-wide shrink tile: 2 splits of 3 and 2 steps under the
# interpreter's 4 SMs, so the partial sum runs. M = 17, 64, 300: the other side of the bound.
_SPLIT_K = 517


def _spy_split_forward(monkeypatch) -> list[int]:
    """Row counts of the calls to the split-shrink forward."""
    calls: list[int] = []
    original = hybrid._split_shrink_forward

    def spy(x, *args):
        calls.append(x.shape[0])
        return original(x, *args)

    monkeypatch.setattr(hybrid, "_split_shrink_forward", spy)
    return calls


@pytest.mark.parametrize("m", [1, 5, 16, 17, 64, 300])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_split_shrink_forward_matches_reference(monkeypatch, m, dropout_p, dtype):
    calls = _spy_split_forward(monkeypatch)
    check_against_reference(make_problem((m,), _SPLIT_K, 93, 5, dtype), dropout_p)
    assert calls == ([m] if m <= hybrid.SPLIT_SHRINK_MAX_M else [])


@pytest.mark.parametrize("r", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_split_shrink_forward_ranks_and_fp32_adapters(monkeypatch, r, dtype, dropout_p):
    calls = _spy_split_forward(monkeypatch)
    check_against_reference(make_problem((7,), _SPLIT_K, 45, r, dtype, lora_dtype=torch.float32), dropout_p)
    check_against_reference(make_problem((3,), _SPLIT_K, 45, r, dtype, bias=False), dropout_p)
    assert calls == [7, 3]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_split_shrink_forward_3d_and_strided(monkeypatch, dropout_p):
    """3-D x of 2 x 5 rows; x strided along K and along rows; transposed W, A and B."""
    calls = _spy_split_forward(monkeypatch)
    pb = make_problem((2, 5), _SPLIT_K, 29, 4, torch.float32)
    check_against_reference(pb, dropout_p)
    pb.x = torch.randn(5, 2, 2 * _SPLIT_K, device=DEVICE)[..., ::2].transpose(0, 1)  # [2, 5, K], k-stride 2
    pb.weight = pb.weight.t().contiguous().t()
    pb.lora_a = pb.lora_a.t().contiguous().t()
    pb.lora_b = pb.lora_b.t().contiguous().t()
    check_against_reference(pb, dropout_p)
    pb.x = torch.randn(11, _SPLIT_K + 40, device=DEVICE)[:, 13:13 + _SPLIT_K]  # row stride K + 40
    check_against_reference(pb, dropout_p)
    assert calls == [10, 10, 11]


@pytest.mark.parametrize("dropout", [False, True])
def test_decode_forward_grid_on_h100(monkeypatch, dropout):
    """At M = 16 on an H100 (132 SMs), K = N = 4096, rank 16: the shrink is split over K into
    16 programs of 2 steps (not one program per row tile over the whole K loop, as the 8
    programs of ``lora_hybrid_fwd_kernel`` were), and the expand sums their 16 partials with
    no K loop of its own. At M = 64 the 16-row tiles of ``lora_hybrid_fwd_kernel`` give 32
    programs (4 row tiles x MAX_SPLIT_N), and it stays (SPLIT_SHRINK_MAX_M)."""
    launches = record_launches(monkeypatch, lora_launch, hybrid)
    monkeypatch.setattr(launch_device, "interpreting", lambda: False)
    monkeypatch.setattr(lora_configs, "device_info", lambda device: (132, 90))
    monkeypatch.setattr(hybrid, "device_info", lambda device: (132, 90))
    meta = torch.device("meta")

    def forward(m: int) -> list[tuple[str, tuple[int, ...], dict]]:
        launches.clear()
        x = torch.empty(m, 4096, dtype=torch.bfloat16, device=meta)
        w = torch.empty(4096, 4096, dtype=torch.bfloat16, device=meta)
        a = torch.empty(16, 4096, dtype=torch.float32, device=meta)
        b = torch.empty(4096, 16, dtype=torch.float32, device=meta)
        seed = torch.empty(1 if dropout else 0, dtype=torch.int64, device=meta)
        hybrid.hybrid_forward(x, w, torch.empty(4096, dtype=torch.bfloat16, device=meta), a, b, 0.5,
                              0.1 if dropout else 0.0, seed)
        return [(getattr(fn, "fn", fn).__name__, grid, dict(zip(fn.arg_names, args)))
                for (fn, args, _), grid in zip(launches, launches.grids)]

    (shrink, shrink_grid, _), (expand, expand_grid, expand_args) = forward(16)
    assert shrink == "lora_shrink_kernel" and shrink_grid == (1, 16)
    assert expand == "lora_fwd_split_epilogue_kernel" and expand_grid == (32,)
    assert expand_args["num_splits"] == 0 and expand_args["num_parts"] == 16
    ((name, grid, _),) = forward(64)
    assert name == "lora_hybrid_fwd_kernel" and grid == (32,)
