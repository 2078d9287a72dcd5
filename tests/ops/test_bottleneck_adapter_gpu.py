"""The bottleneck adapter's kernels on a GPU (skipped without CUDA): the tensor-core paths the
interpreter cannot run (bf16 / fp16 h with fp16 or fp32 adapters, tf32 products), every
kernel tile (rank 16..256, the weight-gradient GEMMs and dh kernel above 64, decode and multi-program M),
dropout, the learned scaling, CUDA-graph capture (no host sync) and bitwise-reproducible
gradients, for the Triton kernels and, when built, the CUDA C++ ones."""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops import bottleneck_adapter
from tests.helpers.bottleneck_problem import check_against_reference, make_problem
from tests.helpers.numerics import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request, monkeypatch) -> str:
    if request.param == "cuda":
        from fastpeft import cuda_ext

        try:
            cuda_ext.load()
        except RuntimeError as exc:
            pytest.skip(f"CUDA C++ extension unavailable: {exc}")
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("m,d,r", [(1, 768, 16), (513, 768, 64), (300, 1024, 128), (64, 4096, 48), (257, 4096, 256)])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_against_float64(gpu_backend, m, d, r, dtype, w_dtype):
    check_against_reference(make_problem((m,), d, r, dtype, w_dtype), "gelu_new")


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "linear"])
def test_dropout_and_activations(gpu_backend, activation):
    check_against_reference(make_problem((4, 33), 768, 32, torch.bfloat16, residual=True), activation, 0.1)


def test_cuda_graph_capture_and_deterministic_backward(gpu_backend):
    pb = make_problem((256,), 1024, 64, torch.bfloat16, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (pb.h, pb.w_down, pb.b_down, pb.w_up, pb.b_up)]
    scaling = torch.tensor(0.5, device="cuda", requires_grad=True)

    def step() -> list[torch.Tensor]:
        for t in (*leaves, scaling):
            t.grad = None
        bottleneck_adapter(*leaves, "silu", scaling, None, 0.1, training=True).float().square().sum().backward()
        return [t.grad.clone() for t in (*leaves, scaling)]

    torch.manual_seed(0)
    first = step()
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, step()))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the side stream, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static = [t.detach().clone() for t in leaves]
    with torch.cuda.graph(graph):
        bottleneck_adapter(*static, "silu", 0.5, None, 0.1, training=True)  # dropout captures too (no host sync)
        out = bottleneck_adapter(*static, "silu", 0.5, None, 0.0)
    static[0].copy_(torch.randn_like(static[0]))  # new h in the captured buffer: the replay must read it
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, bottleneck_adapter(*static, "silu", 0.5, None, 0.0).double(), torch.bfloat16, "replayed out")
