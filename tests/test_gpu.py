"""Checks that need a CUDA device (skipped without one): the real Triton kernels against
float64 in bf16 (which the interpreter cannot compute), no host synchronisation, and
capture of forward + backward in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from tests.numerics import assert_close
from tests.test_lora_linear_op import check_against_reference, make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    """The kernels are opt-in on CUDA until validated there: these tests opt in."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")


# Llama-like sizes, each kernel regime: decode, medium and large M.
GPU_SHAPES = [(1, 4096, 1024), (16, 4096, 4096), (300, 1000, 3000), (2048, 4096, 1024)]


@pytest.mark.parametrize("m,k,n", GPU_SHAPES)
@pytest.mark.parametrize("r", [8, 16, 64, 128])  # 128: above MAX_RANK, the torch path on the GPU
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bf16_kernels_match_float64(m, k, n, r, dropout_p, lora_dtype):
    check_against_reference(make_problem((m,), k, n, r, torch.bfloat16, lora_dtype=lora_dtype), dropout_p)


def _layer_step(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    y.float().square().mean().backward()
    return y


def test_no_host_sync_in_forward_and_backward():
    layer = fastpeft.LoRALinear(1024, 768, r=16, lora_dropout=0.1, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 100, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
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


def test_cuda_graph_replay_equals_eager():
    torch.manual_seed(0)
    layer = fastpeft.LoRALinear(512, 384, r=8, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
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


def test_cuda_graph_replays_draw_fresh_dropout():
    layer = fastpeft.LoRALinear(512, 384, r=8, lora_dropout=0.3, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graph, static_y = _capture(layer, x)
    graph.replay()
    first = static_y.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(first).all() and torch.isfinite(static_y).all()
    assert not torch.equal(first, static_y)
