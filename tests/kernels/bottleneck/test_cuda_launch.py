"""The CUDA C++ bottleneck adapter kernels (csrc/bottleneck.cu) through their launcher
(fastpeft.kernels.bottleneck.cuda_launch), run on the CPU by the kernels' emulation
(tests/helpers/cuda_emulation.py), against the float64 reference for out, z and every gradient
(the cases and their check, which the GPU tests run too, are in
tests/helpers/cuda_bottleneck_cases.py).

The emulation runs the kernels' own code (written once against csrc/block.h) thread by
thread, and the tensor-core forward's wmma calls through csrc/tensor_core.h's fp32 emulation
(one 16 x 16 tile per warp), so these tests cover the kernels' indexing, staging, dropout bits,
activations, split partial sums and the launcher's plumbing; the block's barriers on shared memory are
tests/test_cuda_barriers.py's. What they cannot cover (timing, global-memory ordering, the
GPU's own arithmetic units) is left to tests/test_gpu.py on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.bottleneck import cuda_launch
from tests.helpers.cuda_bottleneck_cases import CASE_ARGS, CASES, case_inputs, check_case, float64_reference
from tests.helpers.cuda_emulation import block_order, emulate_cuda_kernels
from tests.helpers.numerics import assert_close


@pytest.fixture
def emulated(monkeypatch):
    return emulate_cuda_kernels(monkeypatch)


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_forward_and_every_gradient_match_float64(emulated, m, d, r, activation, bias, separate_residual, dropout_p,
                                                   dtype, w_dtype, tensor_scaling, strided):
    check_case("cpu", m, d, r, activation, bias, separate_residual, dropout_p, dtype, w_dtype, tensor_scaling, strided)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # CUDA-core and tensor-core kernels
def test_backward_computes_only_what_is_asked(emulated, dtype):
    h, w_down, b_down, w_up, b_up, grad_out = case_inputs(9, 33, 12, dtype, dtype, True)
    seed = torch.tensor([7], dtype=torch.int64)
    _, z = cuda_launch.bottleneck_forward(h, w_down, b_down, w_up, b_up, None, "silu", 1.5, 0.0, seed)
    _, _, exp = float64_reference(h, w_down, b_down, w_up, b_up, None, "silu", 1.5, 0.0, seed, grad_out)
    for i in range(6):
        needs = tuple(j == i for j in range(6))
        grads = cuda_launch.bottleneck_backward(grad_out, h, w_down, w_up, b_up, z, "silu", 1.5, 0.0, seed, True, needs)
        assert [g is not None for g in grads] == list(needs)
        assert_close(grads[i].reshape(exp[i].shape), exp[i], dtype, f"gradient {i} alone")


def test_bad_arguments_raise_clearly(emulated):
    h, w_down, b_down, w_up, b_up, _ = case_inputs(4, 16, 8, torch.float32, torch.float32, True)
    seed = torch.tensor([1], dtype=torch.int64)
    with pytest.raises(ValueError, match="weights must have h's dtype or float32"):
        cuda_launch.bottleneck_forward(h, w_down.half(), None, w_up.half(), None, None, "relu", 1.0, 0.0, seed)
    big_down, big_up = torch.randn(257, 16), torch.randn(16, 257)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 256\]"):
        cuda_launch.bottleneck_forward(h, big_down, None, big_up, None, None, "relu", 1.0, 0.0, seed)
    with pytest.raises(ValueError, match="float64"):
        cuda_launch.bottleneck_forward(h.double(), w_down.double(), None, w_up.double(), None, None, "relu", 1.0, 0.0,
                                       seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows(emulated, dtype):
    """M = 0: empty outputs of the right shapes and dtypes, zero weight gradients."""
    h, w_down, b_down, w_up, b_up, grad_out = case_inputs(0, 24, 8, dtype, dtype, True)
    seed = torch.tensor([3], dtype=torch.int64)
    out, z = cuda_launch.bottleneck_forward(h, w_down, b_down, w_up, b_up, None, "relu", 1.0, 0.0, seed)
    assert out.shape == (0, 24) and out.dtype == dtype and z.shape == (0, 8) and z.dtype == torch.float32
    grads = cuda_launch.bottleneck_backward(grad_out, h, w_down, w_up, b_up, z, "relu", 1.0, 0.0, seed, True,
                                            (True,) * 6)
    assert grads[0].shape == (0, 24)
    for grad, leaf in zip(grads[1:5], (w_down, b_down, w_up, b_up)):
        assert grad.shape == leaf.shape and not grad.any()
    assert grads[5].item() == 0.0


def test_tensor_core_kernels_are_order_free_and_vectorized(emulated):
    """16-bit h on the tensor-core row kernels (forward, and the backward's dz/dh/ds): the same
    bits in any block order, 16-byte loads for aligned rows (D = 264), and the same bits again
    from element-by-element loads of a strided h and grad_out."""
    ext = emulated
    h, w_down, b_down, w_up, b_up, grad_out = case_inputs(70, 264, 40, torch.bfloat16, torch.bfloat16, True)
    seed = torch.tensor([11], dtype=torch.int64)
    needs = (True, False, False, False, False, True)  # dh and ds: the row kernel's outputs only

    def run(h, grad_out):
        out, z = cuda_launch.bottleneck_forward(h, w_down, b_down, w_up, b_up, None, "gelu", 0.5, 0.2, seed)
        grads = cuda_launch.bottleneck_backward(grad_out, h, w_down, w_up, b_up, z, "gelu", 0.5, 0.2, seed, True, needs)
        return out, z, grads[0], grads[5]

    runs = []
    ext.emulation_load_counts()
    for order in (0, 5, 99):
        with block_order(order):
            runs.append(run(h, grad_out))
    vector, _ = ext.emulation_load_counts()
    assert vector > 0
    assert all(torch.equal(a, b) for other in runs[1:] for a, b in zip(runs[0], other))
    strided = run(h.t().contiguous().t(), grad_out.t().contiguous().t())
    assert all(torch.equal(a, b) for a, b in zip(runs[0], strided))
