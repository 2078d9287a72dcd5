"""Which implementation an op runs: the Triton kernels or the torch composite path.

``FASTPEFT_BACKEND`` (read at every call, so tests can switch it):
- ``auto`` (default): the torch path, and the Triton kernels for CUDA tensors once
  ``KERNELS_VALIDATED_ON_GPU`` is set.
- ``triton``: Triton kernels for CUDA tensors; CPU tensors take them only under Triton's
  interpreter (``TRITON_INTERPRET=1``, set before Triton is imported), which is how the tests
  run the kernels without a GPU, and the torch path otherwise. So a GPU run can force the
  kernels while its CPU-model tests keep running on the torch path.
- ``torch``: the torch path everywhere (also on CUDA).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_CHOICES = ("auto", "triton", "torch")

# The Triton kernels are correct in the interpreter and compile for sm_80/sm_90, but no GPU
# has run them yet (their bf16 tensor-core path cannot run in the interpreter at all). Until
# scripts/gpu_run.sh has passed on a GPU (recorded in bench/RESULTS.md), they are opt-in on
# CUDA (FASTPEFT_BACKEND=triton) and ``auto`` takes the torch path; then set this to True.
KERNELS_VALIDATED_ON_GPU = False


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (looked up once: it is on every call's path)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` go to the Triton kernels under the current setting."""
    choice = os.environ.get("FASTPEFT_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FASTPEFT_BACKEND={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return False
    if choice == "auto":
        return KERNELS_VALIDATED_ON_GPU and device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError("FASTPEFT_BACKEND=triton but the triton package is not installed")
    return device.type == "cuda" or (device.type == "cpu" and interpreting())
