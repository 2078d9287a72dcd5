"""Loader of fastpeft's optional CUDA C++ extension ``fastpeft._C`` (sources in ``csrc/``).

``pip install`` builds ``fastpeft._C`` with ninja for sm_80 and sm_90 when nvcc is present
(the root ``CMakeLists.txt``); without nvcc the package is pure Python and the CUDA backend is
simply unavailable. The extension links only the CUDA runtime (statically) and takes raw
device addresses (``tensor.data_ptr()``) and the current stream
(``torch.cuda.current_stream().cuda_stream``), so it does not depend on torch's C++ ABI and
needs no rebuild per torch version.

The kernels are **opt-in**: no GPU has run them yet (``FASTPEFT_BACKEND=cuda`` selects them).

- ``available()``: True when the extension is built and a CUDA device is usable; never raises.
- ``load()``: the module, or a RuntimeError saying why it cannot run (not built, could not be
  imported, no CUDA device with the error ``cudaGetDeviceCount`` returned) -- never a crash:
  importing the module touches no device, and the device check goes through
  ``cudaGetDeviceCount``, which reports a missing driver or device as an error code.
- ``extension()``: the module without the device check (its host test entry points,
  ``philox4x32_host``, ``keep_mask_host``, ``activation_host``, run on any machine).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch

EXTENSION_MODULE = "fastpeft._C"
NOT_BUILT = (
    "fastpeft._C was not built: no CUDA compiler at install time (reinstall with nvcc on PATH, "
    "or CUDACXX=/path/to/nvcc, to build the CUDA C++ kernels; see README)"
)


@functools.cache
def extension() -> ModuleType:
    """The imported ``fastpeft._C`` (no device needed), or RuntimeError if it is not built or
    cannot be imported."""
    if importlib.util.find_spec(EXTENSION_MODULE) is None:
        raise RuntimeError(NOT_BUILT)
    try:
        return importlib.import_module(EXTENSION_MODULE)
    except ImportError as exc:
        raise RuntimeError(f"fastpeft._C is installed but could not be imported: {exc}") from exc


@functools.cache
def _device_problem() -> str | None:
    """Why the extension cannot launch kernels (not built, no device), or None if it can.

    Cached: the device count of a process does not change (as torch caches it too)."""
    try:
        module = extension()
    except RuntimeError as exc:
        return str(exc)
    code, text, count = module.cuda_device_count()
    if code != 0:
        return f"fastpeft._C: no CUDA device: cudaGetDeviceCount returned {code} ({text})"
    if count == 0:
        return "fastpeft._C: no CUDA device: cudaGetDeviceCount found 0 devices"
    return None


def available() -> bool:
    """True when ``fastpeft._C`` is built and can launch kernels on a CUDA device; never raises."""
    return _device_problem() is None


def load() -> ModuleType:
    """``fastpeft._C``, ready to launch kernels; RuntimeError with the reason otherwise."""
    problem = _device_problem()
    if problem is not None:
        raise RuntimeError(problem)
    return extension()


# ---------------------------------------------------------------------------------------------
# Argument helpers shared by the CUDA launchers (fastpeft.kernels.*.cuda_launch).
# ---------------------------------------------------------------------------------------------


def dtype_code(dtype: torch.dtype) -> int:
    """The extension's code for a tensor dtype (float32, float16, bfloat16); ValueError otherwise."""
    name = str(dtype).removeprefix("torch.")
    codes = extension().DTYPES
    if name not in codes:
        raise ValueError(f"fastpeft._C kernels take {', '.join(codes)} tensors, got {dtype}")
    return codes[name]


def matrix(t: torch.Tensor) -> tuple[int, int, int]:
    """A 2-D tensor as the extension's ``(address, stride 0, stride 1)`` (strides in elements)."""
    return (t.data_ptr(), *t.stride())


def vector(t: torch.Tensor | None) -> tuple[int, int]:
    """A 1-D tensor (or None: absent) as the extension's ``(address or 0, stride)``."""
    return (0, 0) if t is None else (t.data_ptr(), t.stride(0))


def address(t: torch.Tensor | None) -> int:
    """A tensor's device address, or 0 for None (an output the kernels skip)."""
    return 0 if t is None else t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as the integer handle the kernels launch on."""
    return torch.cuda.current_stream(t.device).cuda_stream


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (torch caches the device properties: no sync)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
