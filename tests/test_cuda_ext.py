"""fastpeft._C (csrc/) on a machine without a GPU: the loader's messages, and the kernels'
per-element math (csrc/elementwise.h, run on the CPU through the module's host entry points)
against Triton's Philox in the interpreter, fastpeft's torch Philox and torch's activations."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from fastpeft import check_cuda, cuda_ext
from fastpeft.kernels import dropout_mask
from fastpeft.kernels.bottleneck.ref import CANONICAL_ACTIVATIONS
from tests.helpers.bottleneck_problem import REFERENCE_ACTIVATIONS
from tests.helpers.cuda_emulation import built_extension

MASK64 = (1 << 64) - 1
# The loader's cached functions (tests may monkeypatch the module attributes).
_CACHED = (cuda_ext.extension, cuda_ext._device_problem)


@pytest.fixture
def fresh_loader():
    """Forget what cuda_ext cached about the extension, before and after the test."""
    for cached in _CACHED:
        cached.cache_clear()
    yield
    for cached in _CACHED:
        cached.cache_clear()


def test_extension_is_built_when_nvcc_is_present():
    """An install on a machine with nvcc builds fastpeft._C (CMakeLists.txt); a missing one
    means the CMake logic skipped it (or the install predates csrc/: reinstall)."""
    if check_cuda.find_nvcc() is None or not check_cuda.cuda_sources():
        pytest.skip("no nvcc or no csrc/: the pure-Python install is expected")
    assert importlib.util.find_spec("fastpeft._C") is not None, (
        "nvcc is present but fastpeft._C is not installed: reinstall with `pip install -e .`"
    )


def test_not_built_reports_clearly(monkeypatch, fresh_loader):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastpeft._C" else real_find_spec(name, *a))
    assert cuda_ext.available() is False
    with pytest.raises(RuntimeError, match="fastpeft._C was not built: no CUDA compiler at install time"):
        cuda_ext.load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a CUDA device")
def test_no_device_reports_clearly_without_crashing(fresh_loader):
    built_extension()
    assert cuda_ext.available() is False
    with pytest.raises(RuntimeError, match=r"no CUDA device: cudaGetDeviceCount (returned \d+ \(cuda\w+: |found 0)"):
        cuda_ext.load()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ((100, "cudaErrorNoDevice: no CUDA-capable device is detected", 0),
         "no CUDA device: cudaGetDeviceCount returned 100 (cudaErrorNoDevice"),
        ((0, "cudaSuccess", 0), "no CUDA device: cudaGetDeviceCount found 0 devices"),
    ],
)
def test_device_count_answers_become_messages(monkeypatch, fresh_loader, answer, message):
    fake = types.SimpleNamespace(cuda_device_count=lambda: answer)
    monkeypatch.setattr(cuda_ext, "extension", lambda: fake)
    assert cuda_ext.available() is False
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(")):
        cuda_ext.load()


def test_constants_agree_with_python():
    ext = built_extension()
    assert ext.PHILOX_ROUNDS == dropout_mask.PHILOX_ROUNDS
    assert set(ext.ACTIVATIONS) == set(CANONICAL_ACTIVATIONS)
    assert set(ext.DTYPES) == {"float32", "float16", "bfloat16"}


def test_philox_matches_the_torch_implementation():
    ext = built_extension()
    counters = [0, 1, 2, 3, 1000, (1 << 32) - 1, 1 << 32, (5 << 32) + 17, MASK64]
    for seed in (0, 1, 20261129, (1 << 40) + 3, -12345 & MASK64):
        got = torch.tensor(ext.philox4x32_host(seed, counters), dtype=torch.int64)
        c = torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in counters], dtype=torch.int64)
        seed_t = torch.tensor([seed - (1 << 64) if seed >= 1 << 63 else seed], dtype=torch.int64)
        lanes = dropout_mask._philox4x32(c & 0xFFFFFFFF, (c >> 32) & 0xFFFFFFFF, seed_t, dropout_mask.PHILOX_ROUNDS)
        assert torch.equal(got, torch.stack(lanes, dim=-1)), f"seed {seed}"


@pytest.mark.parametrize(("rows", "cols", "p"), [(5, 37, 0.3), (3, 64, 0.9), (1, 5, 0.5)])
def test_keep_mask_matches_triton_and_torch(rows, cols, p):
    """The kernels' keep decision (Philox lane col % 4 at counter row * ceil(cols/4) + col/4)
    against the Triton kernels' (keep_mask_kernel, interpreted) and the torch path's."""
    ext = built_extension()
    seed = 987654321
    threshold = dropout_mask.dropout_threshold(p)
    got = torch.frombuffer(bytearray(ext.keep_mask_host(seed, rows, cols, threshold)), dtype=torch.uint8)
    got = got.reshape(rows, cols).bool()
    assert torch.equal(got, dropout_mask.keep_mask_philox(seed, rows, cols, p))
    pytest.importorskip("triton")
    from fastpeft.backend import interpreting

    if not interpreting():
        pytest.skip("Triton's keep_mask_kernel runs on CPU tensors only in the interpreter")
    from fastpeft.kernels.philox_dropout import keep_mask_kernel

    out = torch.full((rows, cols), -1, dtype=torch.int8)
    block_m, block_k = 4, 16
    keep_mask_kernel[(-(-rows // block_m), -(-cols // block_k))](
        torch.tensor([seed], dtype=torch.int64), out, rows, cols, threshold, BLOCK_M=block_m, BLOCK_K=block_k
    )
    assert torch.equal(got, out.bool())
    assert 0 < got.sum() < rows * cols


@pytest.mark.parametrize("name", sorted(CANONICAL_ACTIVATIONS))
def test_activations_and_derivatives_match_torch(name):
    ext = built_extension()
    z = torch.cat([torch.linspace(-12, 12, 241), torch.tensor([0.0, -1e-3, 1e-3, 30.0, -30.0, -100.0])])
    values, grads = ext.activation_host(ext.ACTIVATIONS[name], z.tolist())
    z64 = z.double().requires_grad_()
    expected = REFERENCE_ACTIVATIONS[name](z64)  # the tests' own formulas, not the torch path's table
    (expected_grad,) = torch.autograd.grad(expected.sum(), z64)
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), expected.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(torch.tensor(grads, dtype=torch.float64), expected_grad, rtol=2e-6, atol=2e-6)
