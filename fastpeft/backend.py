"""Which implementation an op runs: the Triton kernels or the torch composite path.

``FASTPEFT_BACKEND`` (read at every call, so tests can switch it):
- ``auto`` (default): Triton kernels for CUDA tensors, torch ops otherwise.
- ``triton``: Triton kernels even for CPU tensors; they then need ``TRITON_INTERPRET=1``
  (set before Triton is imported), which runs them in Triton's interpreter. Tests use this.
- ``torch``: the torch path everywhere (also on CUDA).
"""

from __future__ import annotations

import importlib.util
import os

import torch

_CHOICES = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` go to the Triton kernels under the current setting."""
    choice = os.environ.get("FASTPEFT_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FASTPEFT_BACKEND={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return False
    if choice == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError("FASTPEFT_BACKEND=triton but the triton package is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"FASTPEFT_BACKEND=triton with tensors on {device.type}: Triton kernels run on CPU "
            "tensors only in the interpreter; set TRITON_INTERPRET=1 before importing triton"
        )
    return True
