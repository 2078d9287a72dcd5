"""Backend selection: FASTPEFT_BACKEND and the opt-in state of the GPU kernels."""

from __future__ import annotations

import pytest
import torch

from fastpeft import backend


@pytest.mark.parametrize("choice", ["auto", "AUTO", "torch"])
def test_cpu_tensors_take_the_torch_path(monkeypatch, choice):
    monkeypatch.setenv("FASTPEFT_BACKEND", choice)
    assert not backend.use_triton(torch.device("cpu"))


def test_gpu_kernels_are_opt_in_until_validated(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    cuda = torch.device("cuda")
    assert backend.use_triton(cuda) == (backend.KERNELS_VALIDATED_ON_GPU and backend.triton_available())
    monkeypatch.setattr(backend, "KERNELS_VALIDATED_ON_GPU", True)
    assert backend.use_triton(cuda) == backend.triton_available()
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    assert not backend.use_triton(cuda)


@pytest.mark.skipif(not backend.triton_available(), reason="needs triton")
@pytest.mark.parametrize("choice", ["triton", "hybrid", "Hybrid"])
def test_forcing_kernels_sends_cpu_tensors_to_them_only_in_the_interpreter(monkeypatch, choice):
    """``triton`` (fused kernels) and ``hybrid`` (cuBLAS-hybrid path) force Triton kernels on
    CUDA tensors; CPU tensors run them in the interpreter, and otherwise (a GPU run's
    CPU-model tests) take the torch path."""
    monkeypatch.setenv("FASTPEFT_BACKEND", choice)
    assert backend.backend_choice() == choice.lower()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.use_triton(torch.device("cpu"))
    assert backend.use_triton(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.use_triton(torch.device("cpu"))


@pytest.mark.parametrize("choice", ["triton", "hybrid"])
def test_forcing_kernels_without_triton_is_an_error(monkeypatch, choice):
    monkeypatch.setenv("FASTPEFT_BACKEND", choice)
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=f"FASTPEFT_BACKEND={choice} but the triton package"):
        backend.use_triton(torch.device("cuda"))


def test_unknown_choice_lists_the_choices(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cublas")
    with pytest.raises(ValueError, match="auto, triton, hybrid, cuda, torch"):
        backend.backend_choice()


def test_cuda_choice_selects_the_extension_for_cuda_tensors_only(monkeypatch):
    """``cuda`` picks the CUDA C++ implementation for CUDA tensors; everything else (CPU
    tensors, ops without one: ``use_triton``) gets what ``auto`` gives."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "CUDA")
    assert backend.backend_choice() == "cuda"
    assert backend.use_cuda_extension(torch.device("cuda"))
    assert not backend.use_cuda_extension(torch.device("cpu"))
    for validated in (False, True):
        monkeypatch.setattr(backend, "KERNELS_VALIDATED_ON_GPU", validated)
        monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
        expected = {dev: backend.use_triton(torch.device(dev)) for dev in ("cpu", "cuda")}
        monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
        assert {dev: backend.use_triton(torch.device(dev)) for dev in ("cpu", "cuda")} == expected
    for choice in ("auto", "triton", "hybrid", "torch"):
        monkeypatch.setenv("FASTPEFT_BACKEND", choice)
        assert not backend.use_cuda_extension(torch.device("cuda"))
