"""The CUDA C++ kernels (fastpeft._C, csrc/) on a real GPU (skipped without one): the same
float64 checks as the CPU emulation tests, plus what only a GPU shows -- the kernels
launch and finish without errors, results are bitwise reproducible run to run (no atomics),
the decode step is capturable in a CUDA graph and replays with another adapter mix.

A GPU run that cannot load the extension fails here with the loader's reason (not built,
or ``cudaGetDeviceCount`` failing: e.g. a driver older than the CUDA runtime it was built
with) rather than skipping: these are the tests that make the kernels eligible for a default.
"""

from __future__ import annotations

import pytest
import torch

from fastpeft import cuda_ext
from fastpeft.kernels.multi_lora.cuda_launch import multi_lora_decode
from tests.helpers.cuda_bottleneck_cases import CASE_ARGS, CASES, check_case
from tests.helpers.multi_lora_decode import decode_reference, padded_slots
from tests.helpers.numerics import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def extension_loads():
    cuda_ext.load()  # raises with the reason if the extension cannot run here


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_bottleneck_matches_float64_and_is_reproducible(m, d, r, activation, bias, separate_residual, dropout_p, dtype,
                                                        w_dtype, tensor_scaling, strided):
    args = (m, d, r, activation, bias, separate_residual, dropout_p, dtype, w_dtype, tensor_scaling, strided)
    first = check_case("cuda", *args)
    second = check_case("cuda", *args)
    torch.cuda.synchronize()
    for a, b in zip(first, second):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), "not bitwise reproducible"


@pytest.mark.parametrize(("m", "d", "r"), [(8192, 4096, 64), (1, 4096, 16)])
def test_bottleneck_at_benchmark_shapes(m, d, r):
    """The issue's benchmark shapes in bf16 (many row blocks and splits; the decode row)."""
    check_case("cuda", m, d, r, "gelu", True, False, 0.1, torch.bfloat16, torch.bfloat16, False, False)


def _decode_problem(num_tokens, k, n, dtype, device="cuda"):
    g = torch.Generator().manual_seed(0)
    ranks = torch.tensor([3, 16, 40, 0], dtype=torch.int64)
    lora_a, lora_b = padded_slots(4, 16, k, n, ranks, dtype, g)
    scalings = torch.tensor([0.5, 2.0, 1.25, 3.0])
    x = torch.randn(num_tokens, k, generator=g).to(dtype)
    y = torch.randn(num_tokens, n, generator=g).to(dtype)
    return [t.to(device) for t in (y, x, lora_a, lora_b, scalings, ranks)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_reference_and_replays_in_a_cuda_graph(dtype):
    """64 tokens, K = N = 4096: reproducible bit for bit, against float64, and replayable."""
    y0, x, lora_a, lora_b, scalings, ranks = _decode_problem(64, 4096, 4096, dtype)
    ids = torch.tensor([0, 1, 2, 3, -1, 4, 1, 2] * 8, dtype=torch.int64, device="cuda")
    y, again = y0.clone(), y0.clone()
    multi_lora_decode(y, x, lora_a, lora_b, scalings, ids, ranks)
    multi_lora_decode(again, x, lora_a, lora_b, scalings, ids, ranks)
    assert torch.equal(y, again), "the K/N-split decode is not bitwise reproducible"
    expected = decode_reference(y0.cpu(), x.cpu(), lora_a.cpu(), lora_b.cpu(), scalings.cpu(), ids.cpu(),
                                ranks.cpu())
    assert_close(y.cpu(), expected, dtype, "y")
    # Capture once, replay with another adapter mix written into the same ids buffer.
    graph_y = y0.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        multi_lora_decode(graph_y.clone(), x, lora_a, lora_b, scalings, ids, ranks)  # warm-up off the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            multi_lora_decode(graph_y, x, lora_a, lora_b, scalings, ids, ranks)
    new_ids = ids.flip(0).clone()
    ids.copy_(new_ids)
    graph_y.copy_(y0)
    graph.replay()
    torch.cuda.synchronize()
    expected = decode_reference(y0.cpu(), x.cpu(), lora_a.cpu(), lora_b.cpu(), scalings.cpu(),
                                new_ids.cpu(), ranks.cpu())
    assert_close(graph_y.cpu(), expected, dtype, "y after graph replay")


def _spy(monkeypatch, module, name):
    """Count calls of ``module.name`` (the op must reach the CUDA launcher, not another path)."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_ops_reach_the_cuda_kernels_with_fastpeft_backend_cuda(monkeypatch):
    """``FASTPEFT_BACKEND=cuda`` routes both ops to these kernels: bottleneck_adapter forward
    and backward (3-D h, autograd) and multi_lora_linear's decode forward, against float64."""
    from fastpeft.kernels.bottleneck import cuda_launch as bottleneck_cuda
    from fastpeft.kernels.multi_lora import cuda_launch as multi_lora_cuda
    from fastpeft.kernels.multi_lora.ref import multi_lora_linear_ref
    from fastpeft.ops import bottleneck_adapter, bottleneck_adapter_ref, multi_lora_linear

    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    calls = _spy(monkeypatch, bottleneck_cuda, "bottleneck_forward")
    backward_calls = _spy(monkeypatch, bottleneck_cuda, "bottleneck_backward")
    decode_calls = _spy(monkeypatch, multi_lora_cuda, "multi_lora_decode")
    g = torch.Generator().manual_seed(3)
    dev, dt = "cuda", torch.bfloat16
    h = torch.randn(2, 9, 768, generator=g).to(dev, dt).requires_grad_()
    w_down = (torch.randn(48, 768, generator=g) / 768**0.5).to(dev, dt).requires_grad_()
    w_up = (torch.randn(768, 48, generator=g) / 48**0.5).to(dev, dt).requires_grad_()
    out = bottleneck_adapter(h, w_down, None, w_up, None, activation="gelu", scaling=0.5)
    grad = torch.randn(out.shape, generator=g).to(dev, dt)
    out.backward(grad)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (h, w_down, w_up)]
    expected = bottleneck_adapter_ref(leaves[0], leaves[1], None, leaves[2], None, activation="gelu", scaling=0.5)
    expected.backward(grad.cpu().double())
    assert_close(out.detach().cpu(), expected.detach(), dt, "bottleneck out")
    for name, got, leaf in zip(("h", "w_down", "w_up"), (h, w_down, w_up), leaves):
        assert_close(got.grad.cpu(), leaf.grad, dt, f"bottleneck grad {name}")
    assert calls and backward_calls, "bottleneck_adapter did not call the CUDA launchers"

    x = torch.randn(8, 512, generator=g).to(dev, dt)
    weight = (torch.randn(1024, 512, generator=g) / 512**0.5).to(dev, dt)
    lora_a = (torch.randn(3, 16, 512, generator=g) / 512**0.5).to(dev, dt)
    lora_b = (torch.randn(3, 1024, 16, generator=g) / 4).to(dev, dt)
    scalings = torch.tensor([1.0, 0.5, 2.0], device=dev)
    ids = torch.tensor([0, 1, 2, -1, 2, 2, 0, 1], device=dev)
    y = multi_lora_linear(x, weight, None, lora_a, lora_b, scalings, ids)
    cpu = [t.cpu().double() for t in (x, weight)] + [None] + [t.cpu().double() for t in (lora_a, lora_b, scalings)]
    expected = multi_lora_linear_ref(*cpu, ids.cpu())
    assert_close(y.cpu(), expected, dt, "multi_lora_linear y")
    assert decode_calls, "multi_lora_linear did not call the CUDA decode launcher"
