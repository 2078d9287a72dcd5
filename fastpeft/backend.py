"""Which implementation an op runs: Triton kernels or the torch composite path.

``FASTPEFT_BACKEND`` (read at every call, so tests can switch it):
- ``auto`` (default): the torch path; for CUDA tensors, the LoRA op, the bottleneck adapter and the
  multi-LoRA forward follow the table ``fastpeft tune`` made on that GPU and software, if there is
  one (``fastpeft.kernels.tuned_table``: only kernels that passed validation there); without one,
  once ``KERNELS_VALIDATED_ON_GPU`` is set, the kernels (for LoRA, the implementation the
  per-shape dispatch table picks: ``fastpeft.kernels.lora.dispatch``).
- ``triton``: the fused Triton kernels (base GEMM and LoRA term in one kernel) for CUDA
  tensors; CPU tensors take them only under Triton's interpreter (``TRITON_INTERPRET=1``, set
  before Triton is imported), which is how the tests run the kernels without a GPU, and the
  torch path otherwise. So a GPU run can force the kernels while its CPU-model tests keep
  running on the torch path.
- ``hybrid``: the cuBLAS-hybrid path (cuBLAS base GEMM accumulating onto Triton's LoRA
  term), for the same tensors as ``triton``.
- ``cuda``: the CUDA C++ implementation (``csrc/``, built into the optional extension
  ``fastpeft._C``: ``fastpeft.cuda_ext.load``) for CUDA tensors, in the ops that have one (the
  bottleneck adapter; multi-LoRA decode); CPU tensors, and the ops without one, take what
  ``auto`` would. An op asked for it raises a clear
  RuntimeError when the extension is not built or cannot run.
- ``torch``: the torch path everywhere (also on CUDA).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_CHOICES = ("auto", "triton", "hybrid", "cuda", "torch")

# The Triton kernels (fused and hybrid) are correct in the interpreter and compile for
# sm_80/sm_90, but no GPU has run them yet (their bf16 tensor-core path cannot run in the
# interpreter at all). Until scripts/gpu_run.sh has passed on a GPU (recorded in
# bench/RESULTS.md), they are opt-in on CUDA (FASTPEFT_BACKEND=triton or hybrid) and ``auto``
# takes the torch path; then set this to True, and ``auto`` follows the dispatch table.
KERNELS_VALIDATED_ON_GPU = False


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (looked up once: it is on every call's path)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_choice() -> str:
    """The validated, lower-cased ``FASTPEFT_BACKEND`` (``auto`` when unset)."""
    choice = os.environ.get("FASTPEFT_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FASTPEFT_BACKEND={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def resolve_choice(choice: str | None) -> str:
    """An op's per-call ``backend=`` argument, validated and lower-cased; None means
    ``FASTPEFT_BACKEND`` (``backend_choice``)."""
    if choice is None:
        return backend_choice()
    if not isinstance(choice, str) or choice.lower() not in _CHOICES:
        raise ValueError(f"backend={choice!r}: expected None or one of {', '.join(_CHOICES)}")
    return choice.lower()


def use_triton(device: torch.device, choice: str | None = None) -> bool:
    """Whether tensors on ``device`` go to Triton kernels (fused or hybrid) under the current
    setting (or ``choice``, an op's per-call override); which of the two is
    ``fastpeft.kernels.lora.dispatch``'s choice."""
    choice = choice or backend_choice()
    if choice == "torch":
        return False
    if choice in ("auto", "cuda"):
        return KERNELS_VALIDATED_ON_GPU and device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(f"FASTPEFT_BACKEND={choice} but the triton package is not installed")
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def follows_tuned_table(device: torch.device, choice: str | None = None) -> bool:
    """Whether an op on ``device`` asks the table ``fastpeft tune`` made on this GPU first
    (``fastpeft.kernels.tuned_table``): ``auto`` (or ``choice``) on a CUDA device with Triton
    installed (the kernels it may pick are Triton's and the CUDA extension's)."""
    return (choice or backend_choice()) == "auto" and device.type == "cuda" and triton_available()


def use_cuda_extension(device: torch.device, choice: str | None = None) -> bool:
    """Whether an op that has a CUDA C++ implementation runs it for tensors on ``device``:
    ``FASTPEFT_BACKEND=cuda`` (or ``choice``) and a CUDA device (ops without one follow
    ``use_triton``)."""
    return (choice or backend_choice()) == "cuda" and device.type == "cuda"
