"""Checks that need a CUDA device (skipped without one), for each kernel backend: the fused
Triton kernels (``FASTPEFT_BACKEND=triton``) and the cuBLAS-hybrid path (``hybrid``, skipped
until ``fastpeft.backend`` offers it).

- forward and every gradient against float64, in bf16 and fp16 (the tensor-core paths, which
  the interpreter cannot run: it computes bf16 in fp32), with adapters in the activation dtype or fp32 (PEFT's default), with and
  without dropout, at every kernel regime of M and at K / N of tile sizes and of none (each
  case checks that the kernels ran, not the torch path);
- the kernels take CUDA tensors only (CPU tensors take the torch path in a GPU run, where
  Triton's interpreter is off) and launch on the tensors' device;
- no host synchronisation, capture and replay of forward + backward in a CUDA graph, fresh
  dropout per replay, and bitwise-equal gradients run to run in deterministic mode;
- the opt-in sm_90 TMA forward (``FASTPEFT_LORA_TMA=1``): launched, against float64, repeatable;
- the multi-LoRA op's torch path (``FASTPEFT_BACKEND=torch``): no host synchronisation, and
  a captured forward + backward replayed on new inputs equals the eager step.

Shapes are chosen so that tests share kernel specializations: Triton's JIT compile (~1-2 s per
configuration) is most of this file's time on a GPU (scripts/gpu_run.sh gives it 200 s).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastpeft
from fastpeft import backend
from fastpeft.kernels.dropout_mask import draw_seed
from tests.helpers.numerics import assert_close
from tests.helpers.lora_problem import SCALING, Problem, check_against_reference, make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP32 = torch.float32
# FASTPEFT_BACKEND values that run kernels, and the launcher functions the op calls for each
# (module, forward, backward), which the spy test watches.
KERNEL_BACKENDS = ["triton", "hybrid"]
LAUNCHERS = {
    "triton": ("fastpeft.kernels.lora.launch", "lora_forward", "lora_backward"),
    "hybrid": ("fastpeft.kernels.lora.hybrid_launch", "hybrid_forward", "hybrid_backward"),
}


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request, monkeypatch) -> str:
    """Force one kernel backend for the test."""
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


# M: decode (1: also Triton's == 1 specialization; 16), the first medium size (17, not a
# multiple of 16), medium (64, 512) and a training batch (4096).
MS = [1, 16, 17, 64, 512, 4096]
# (K, N): Llama's q/o, and both odd for the tiles (multiples of 16, as the kernels need, but
# of no tile size: partial tiles in every dimension). Shapes the kernels refuse (K = 4095) run
# the torch path: tests/ops covers that on CPU.
KN = [(4096, 4096), (2064, 1040)]
# (adapter dtype, dropout) rotate over M and (K, N), so that every combination meets each
# activation dtype and each (K, N) while the specializations to compile stay few (the full
# cross would be 4x the compiles). None: the activation dtype.
ADAPTER_DROPOUT = [(None, 0.0), (FP32, 0.0), (None, 0.1), (FP32, 0.1)]


def _matrix() -> list:
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for j, (k, n) in enumerate(KN):
            for i, m in enumerate(MS):
                lora_dtype, dropout_p = ADAPTER_DROPOUT[(i + 2 * j) % len(ADAPTER_DROPOUT)]
                lora_name = "fp32" if lora_dtype is FP32 else "same"
                cases.append(pytest.param(dtype, lora_dtype or dtype, m, k, n, dropout_p,
                                          id=f"{str(dtype)[6:]}-{lora_name}A-M{m}-K{k}-N{n}-p{dropout_p}"))
    return cases


# The problem the placement, spy and layer tests share: M = 64 on q/o, bf16 with fp32 adapters
# and dropout, one of the matrix's cases (so its kernels are compiled once).
SHARED = {"m": 64, "k": 4096, "n": 4096, "r": 16}


def _shared_problem() -> Problem:
    return make_problem((SHARED["m"],), SHARED["k"], SHARED["n"], SHARED["r"], torch.bfloat16, lora_dtype=FP32)


def _moved(pb: Problem, device: torch.device) -> Problem:
    """``pb`` with every tensor on ``device`` (a missing bias stays None)."""
    moved = {f.name: getattr(pb, f.name) for f in dataclasses.fields(pb)}
    return dataclasses.replace(pb, **{name: t if t is None else t.to(device) for name, t in moved.items()})


def _spy(monkeypatch, name: str) -> list[str]:
    """Record the calls of ``name``'s launcher functions."""
    module_name, *functions = LAUNCHERS[name]
    module = pytest.importorskip(module_name)
    calls: list[str] = []
    for function in functions:
        original = getattr(module, function)

        def spy(*args, _function=function, _original=original, **kwargs):
            calls.append(_function)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function, spy)
    return calls


def test_kernels_take_cuda_tensors_only(kernel_backend, monkeypatch):
    """A GPU run forces the kernels for CUDA tensors; its CPU tensors take the torch path,
    since Triton's interpreter is off there (conftest sets it only without CUDA)."""
    assert not backend.interpreting()
    calls = _spy(monkeypatch, kernel_backend)
    check_against_reference(_shared_problem(), 0.1)
    assert calls == list(LAUNCHERS[kernel_backend][1:])
    calls.clear()
    check_against_reference(_moved(make_problem((7,), 33, 21, 4, torch.float32), torch.device("cpu")), 0.1)
    assert calls == []


def test_kernels_launch_on_the_tensors_device(kernel_backend):
    """Tensors on the last GPU while the current device is the first: trivially the same
    device on a one-GPU machine, a cross-device check on more."""
    target = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(0):
        check_against_reference(_moved(_shared_problem(), target), 0.1)


@pytest.mark.parametrize("dtype,lora_dtype,m,k,n,dropout_p", _matrix())
def test_kernels_match_float64(kernel_backend, dtype, lora_dtype, m, k, n, dropout_p, monkeypatch):
    calls = _spy(monkeypatch, kernel_backend)
    check_against_reference(make_problem((m,), k, n, 16, dtype, lora_dtype=lora_dtype), dropout_p)
    assert calls == list(LAUNCHERS[kernel_backend][1:])  # the kernels ran, not the torch path


@pytest.mark.parametrize("r", [1, 8, 64, 128])  # 128: above MAX_RANK, the torch path on the GPU
def test_ranks_match_float64(kernel_backend, r):
    check_against_reference(make_problem((512,), 4096, 4096, r, torch.bfloat16, lora_dtype=FP32), 0.1)


def test_strided_input_without_bias(kernel_backend, monkeypatch):
    """x a column slice of a wider tensor (row stride 2K, start 16 elements in: 16-byte
    aligned, so the kernels take it as it is), no bias."""
    pb = make_problem((64,), 4096, 4096, 16, torch.bfloat16, lora_dtype=FP32, bias=False)
    wide = torch.randn(64, 2 * 4096, device=pb.x.device).to(torch.bfloat16)
    calls = _spy(monkeypatch, kernel_backend)
    check_against_reference(dataclasses.replace(pb, x=wide[:, 16:4112]), 0.1)
    assert calls == list(LAUNCHERS[kernel_backend][1:])


def test_deterministic_mode_gives_bitwise_equal_grads(kernel_backend, monkeypatch):
    """Under ``torch.use_deterministic_algorithms`` two identical steps (same inputs, same
    dropout seed) give bitwise-equal y, dX, dA and dB on the kernels: M = 4096 rows summed
    into dA and dB, K and N of no tile size. ``warn_only``: torch reads ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS's
    condition for determinism) once per process and would otherwise fail every cuBLAS call
    of a process started without it; scripts/gpu_run.sh sets it, and the comparison here is
    the test either way."""
    pb = make_problem((4096,), 2064, 1040, 16, torch.bfloat16, lora_dtype=FP32)
    grad_y = torch.randn(4096, 1040, device=pb.x.device, dtype=torch.bfloat16)
    seed = draw_seed(pb.x.device)
    calls = _spy(monkeypatch, kernel_backend)

    def step() -> list[torch.Tensor]:
        x, a, b = (t.detach().clone().requires_grad_() for t in (pb.x, pb.lora_a, pb.lora_b))
        y, _, _ = torch.ops.fastpeft.lora_linear(x, pb.weight, pb.bias, a, b, SCALING, 0.1, seed)
        y.backward(grad_y)
        return [y, x.grad, a.grad, b.grad]

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = step(), step()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert calls == list(LAUNCHERS[kernel_backend][1:]) * 2
    for name, one, two in zip(("y", "dx", "dA", "dB"), first, second):
        assert torch.equal(one, two), f"{name} differs between two identical deterministic steps"


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not _hopper(), reason="the TMA forward runs on sm_90 and newer")
@pytest.mark.parametrize("dtype,lora_dtype,k,n,dropout_p", [(torch.bfloat16, FP32, 4096, 4096, 0.1),
                                                           (torch.float16, torch.float16, 2064, 1040, 0.0)])
def test_tma_forward_matches_float64_and_repeats_bitwise(dtype, lora_dtype, k, n, dropout_p, monkeypatch):
    """``FASTPEFT_LORA_TMA=1`` at M = 4096 (the large tile, no split-K): the forward GEMM is
    ``lora_fwd_tma_kernel`` on one program per SM; forward and gradients against float64,
    and two forwards with one seed bitwise equal."""
    from fastpeft.kernels.lora import launch

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setenv("FASTPEFT_LORA_TMA", "1")
    grids, kernel = [], launch.lora_fwd_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(launch, "lora_fwd_tma_kernel", Spy())
    pb = make_problem((4096,), k, n, 16, dtype, lora_dtype=lora_dtype)
    check_against_reference(pb, dropout_p)
    tiles = 4096 // 128 * -(-n // 256)
    assert grids == [(min(tiles, torch.cuda.get_device_properties(pb.x.device).multi_processor_count),)]
    seed = draw_seed(pb.x.device)
    first, second = (launch.lora_forward(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, dropout_p, seed)
                     for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def _layer() -> fastpeft.LoRALinear:
    """The shared problem's layer (bf16 base, fp32 adapters) with a nonzero B."""
    layer = fastpeft.LoRALinear(SHARED["k"], SHARED["n"], r=SHARED["r"], lora_dropout=0.1, device="cuda",
                                dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B.weight)
    return layer


def _layer_step(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    y.float().square().mean().backward()
    return y


def test_no_host_sync_in_forward_and_backward(kernel_backend):
    layer = _layer()
    x = torch.randn(4, SHARED["m"] // 4, SHARED["k"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _layer_step(layer, x)  # compile the kernels first (Triton's JIT may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _layer_step(layer, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _capture(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture one training step (forward + backward) of ``layer`` on the static input ``x``."""
    params = (x, layer.lora_A.weight, layer.lora_B.weight)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph (JIT compile, allocator)
            for p in params:
                p.grad = None
            _layer_step(layer, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph):
        y = _layer_step(layer, x)
    return graph, y


def test_cuda_graph_replay_equals_eager(kernel_backend):
    torch.manual_seed(0)
    layer = _layer().eval()  # no dropout: replay and eager must compute the same function
    x = torch.randn(SHARED["m"], SHARED["k"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graph, static_y = _capture(layer, x)
    x.data.copy_(torch.randn_like(x))
    params = (x, layer.lora_A.weight, layer.lora_B.weight)
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_y.clone()] + [p.grad.clone() for p in params]

    x_eager = x.detach().clone().requires_grad_()
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    y = _layer_step(layer, x_eager)
    eager = [y, x_eager.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    for name, got, want in zip(("y", "dx", "dA", "dB"), replayed, eager):
        assert_close(got, want.double(), torch.bfloat16, f"graph replay {name}")


def test_cuda_graph_replays_draw_fresh_dropout(kernel_backend):
    layer = _layer()
    x = torch.randn(SHARED["m"], SHARED["k"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graph, static_y = _capture(layer, x)
    graph.replay()
    first = static_y.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(first).all() and torch.isfinite(static_y).all()
    assert not torch.equal(first, static_y)


# The multi-LoRA op's torch path (FASTPEFT_BACKEND=torch, the default on CUDA for now): its
# static formulation, all slots at once (T >= L) or per token (T < L), must not sync and must
# replay in a CUDA graph with other ids, ranks, slots and inputs. Eight slots of R_MAX 16
# (slot 2 empty), bf16 activations with PEFT's fp32 adapters; ids include ones outside
# [0, L) (no adapter on a GPU).
MULTI_LORA = {"k": 512, "n": 384, "r_max": 16, "slots": 8}


def _multi_lora_inputs(num_tokens: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    k, n, r_max, slots = MULTI_LORA["k"], MULTI_LORA["n"], MULTI_LORA["r_max"], MULTI_LORA["slots"]

    def rand(*shape, dtype=FP32):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    ids = torch.randint(-1, slots, (num_tokens,), generator=g, device="cuda")
    ids[::5] = 2**40
    ranks = torch.randint(0, r_max + 1, (slots,), generator=g, device="cuda")
    ranks[2] = 0
    return dict(x=rand(num_tokens, k, dtype=torch.bfloat16), weight=rand(n, k, dtype=torch.bfloat16) / k**0.5,
                bias=rand(n, dtype=torch.bfloat16), lora_a=rand(slots, r_max, k) / k**0.5,
                lora_b=rand(slots, n, r_max), scalings=torch.rand(slots, generator=g, device="cuda") + 0.5,
                adapter_ids=ids, ranks=ranks)


def _multi_lora_step(inputs: dict) -> torch.Tensor:
    """Forward and backward of the op (gradients into x, lora_a and lora_b)."""
    y = fastpeft.ops.multi_lora_linear(**inputs)
    y.float().square().mean().backward()
    return y


def _multi_lora_leaves(inputs: dict) -> tuple[torch.Tensor, ...]:
    return inputs["x"], inputs["lora_a"], inputs["lora_b"]


@pytest.mark.parametrize("num_tokens", [4, 64])  # per token (T < L), all slots
def test_multi_lora_torch_path_no_host_sync(monkeypatch, num_tokens):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    inputs = _multi_lora_inputs(num_tokens, seed=0)
    for t in _multi_lora_leaves(inputs):
        t.requires_grad_()
    _multi_lora_step(inputs)  # warm up (cuBLAS handles, the allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _multi_lora_step(inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_tokens", [4, 64])
def test_multi_lora_torch_path_cuda_graph_replay_equals_eager(monkeypatch, num_tokens):
    """A step (forward + backward) captured once, replayed after every input changed (x, ids,
    ranks, slot contents, scalings), gives what the same step gives eagerly."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    inputs = _multi_lora_inputs(num_tokens, seed=0)
    leaves = _multi_lora_leaves(inputs)
    for t in leaves:
        t.requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph
            for t in leaves:
                t.grad = None
            _multi_lora_step(inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        static_y = _multi_lora_step(inputs)
    new = _multi_lora_inputs(num_tokens, seed=1)
    with torch.no_grad():
        for name, value in new.items():
            inputs[name].copy_(value)
    for t in leaves:
        t.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_y.clone()] + [t.grad.clone() for t in leaves]

    leaf_names = ("x", "lora_a", "lora_b")
    eager_inputs = {**inputs, **{name: inputs[name].detach().clone().requires_grad_() for name in leaf_names}}
    y = _multi_lora_step(eager_inputs)
    eager = [y] + [t.grad for t in _multi_lora_leaves(eager_inputs)]
    for name, got, want in zip(("y", "dx", "dA", "dB"), replayed, eager):
        assert_close(got, want.double(), got.dtype, f"graph replay {name}")


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens", [4, 64])  # decode kernels / per token, segments / all slots
def test_multi_lora_steps_are_bitwise_reproducible(monkeypatch, backend_name, num_tokens):
    """Two identical steps give bitwise-equal y, dX, dA and dB: the kernels' fixed-order sums
    (no atomics) and the torch path's fixed GEMMs. The interpreter runs programs one after
    another, so only a GPU can show an order-dependent sum."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend_name)

    def step() -> list[torch.Tensor]:
        inputs = _multi_lora_inputs(num_tokens, seed=3)
        for t in _multi_lora_leaves(inputs):
            t.requires_grad_()
        y = _multi_lora_step(inputs)
        return [y] + [t.grad for t in _multi_lora_leaves(inputs)]

    for name, one, two in zip(("y", "dx", "dA", "dB"), step(), step()):
        assert torch.equal(one, two), f"{name} differs between two identical steps"
