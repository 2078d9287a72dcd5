"""Test set-up: run Triton kernels in the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before Triton is imported; neither torch nor fastpeft
imports Triton at import time, so setting it here (before any test module is collected)
takes effect. On a machine with CUDA the kernels run for real, on CUDA tensors only: there
``FASTPEFT_BACKEND=triton`` sends CPU tensors to the torch path (``fastpeft.backend``), so
scripts/gpu_run.sh runs the CPU-tensor suite in a process with the GPU hidden, where the
interpreter takes over as in CI. The device and backends the tests run on
(``tests/helpers/devices.py``) are imported after it is set, since they depend on it.
"""

from __future__ import annotations

import os
import zlib

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from fastpeft.backend import triton_available  # noqa: E402
from tests.helpers.devices import BACKENDS  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per backend, forcing it with FASTPEFT_BACKEND."""
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Fill every buffer the kernels are meant to overwrite with NaN (or -1 for integers),
    so an element a kernel forgets to write shows up in the comparison."""
    if not triton_available():
        return
    from fastpeft.kernels import launch_device

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(launch_device, "empty_output", poisoned)


@pytest.fixture(autouse=True)
def seed_per_test(request):
    """Seed torch's generators from the test's id: every test draws its own fresh random
    inputs, the same ones on every run, in any order and on any xdist worker, so a failure
    reproduces when the test is run alone."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
