"""Launchers run the kernels on their tensors' device, not on torch's current device."""

from __future__ import annotations

import contextlib

import torch

from fastpeft.kernels import launch_device


def test_cuda_tensors_switch_the_current_device(monkeypatch):
    """A tensor on cuda:1 makes cuda:1 current for the block (torch.cuda.device mocked: no GPU here)."""
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    on_gpu1 = torch.empty(0, device="meta").as_subclass(torch.Tensor)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 1)))
    with launch_device.on_device_of(on_gpu1):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_cpu_tensors_change_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda device: (_ for _ in ()).throw(AssertionError("called")))
    with launch_device.on_device_of(torch.zeros(1)):
        pass
