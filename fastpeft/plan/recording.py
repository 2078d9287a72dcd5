"""Run the real launchers without a GPU and keep every launch they would make.

``recording(gpu)`` is a context in which the launch code of ``fastpeft.kernels`` and the
ops' torch paths run on meta tensors (shapes, dtypes and strides, no data, nothing computed)
as they would on ``gpu``:

- every Triton kernel object a ``fastpeft.kernels`` module holds (``*_kernel``) is replaced
  by a stand-in whose ``kernel[grid](*args, **kwargs)`` appends a ``Launch`` with the grid,
  the arguments by parameter name, the constexprs, warps and stages, and the function that
  launched it;
- ``device_info`` (``fastpeft.kernels.lora.configs``, and the modules that imported it) returns
  the GPU's SM count and compute capability, so every tile, split and grid is planned for it;
- ``interpreting`` returns False there, so the launches carry the GPU's constexprs even when
  this process runs Triton's interpreter (the tests do);
- the torch path's dropout-mask drawer (``keep_mask_torch_path``, in the ops
  modules that hold it) draws on a fake CUDA seed (torch's ``FakeTensorMode``: no data), so
  its CUDA branch is the one recorded, and hands back a meta mask of that shape. It is the one
  place the ops branch on ``device.type == "cuda"`` for the planned problems; meta tensors
  take the other branches as CUDA ones do (the launchers copy no aligned contiguous operand,
  the multi-LoRA torch path reads no value on the host). Fake CUDA tensors throughout would be
  closer still, but torch without CUDA cannot index them;
- a ``TorchDispatchMode`` appends a ``Launch`` per aten (or bitsandbytes) op that launches work
  (views, allocations and other ops do not): the torch paths' ops, and the torch ops the launchers
  run between kernels (partial sums, copies of small operands, the hybrid path's cuBLAS GEMM).

So the plan's grids, tiles and splits are the launchers' own, with no second copy of their
rules. The replacements are module attributes, restored on exit; a lock keeps two
recordings apart, but a kernel launched by another thread of this process meanwhile would be
recorded instead of run, so plan in a process that is not also running the kernels.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastpeft import backend
from fastpeft.plan.gpus import GpuSpec

# The launcher modules: importing them imports every kernel module and config module whose
# names the recording replaces.
LAUNCH_MODULES = (
    "fastpeft.kernels.lora.launch",
    "fastpeft.kernels.lora.hybrid_launch",
    "fastpeft.kernels.bottleneck.launch",
    "fastpeft.kernels.multi_lora.launch",
    "fastpeft.kernels.quant.launch",
)
# Namespaces of the torch ops recorded: aten's, and bitsandbytes' (the QLoRA op's torch path
# dequantizes with them on CUDA).
RECORDED_NAMESPACES = ("aten", "bitsandbytes")
# Aten ops that launch nothing: allocations (the launchers' outputs, filled by the kernels)
# and aliases; views are recognised by their schema (``OpOverload.is_view``).
NO_LAUNCH_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh",
    "detach", "alias",
})

# The torch path's dropout-mask function, replaced by name wherever an ops module holds it.
MASK_DRAWER = "keep_mask_torch_path"
# Importing the ops' torch paths imports the modules that hold MASK_DRAWER.
OP_MODULES = ("fastpeft.ops.lora_linear_torch", "fastpeft.ops.bottleneck_adapter_torch",
              "fastpeft.ops.multi_lora_linear_torch")

_LOCK = threading.Lock()


@dataclass(frozen=True)
class Launch:
    """One kernel launch. Triton: ``name`` the kernel, ``grid`` its grid, ``params`` its
    arguments by parameter name plus constexprs, ``num_warps`` and ``num_stages``. Torch:
    ``name`` the aten op (``aten.addmm_.default``), ``op`` the op, ``inputs`` its arguments
    (positional, then keyword values), ``outputs`` the tensors it returned. ``source``: the
    ``fastpeft`` function that made the launch (``fastpeft.kernels.lora.launch.lora_forward``)."""

    name: str
    source: str
    grid: tuple[int, ...] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    op: Any = None
    inputs: tuple[Any, ...] = ()
    outputs: tuple[torch.Tensor, ...] = ()

    @property
    def is_triton(self) -> bool:
        return self.grid is not None

    @property
    def ctas(self) -> int | None:
        """Programs (CTAs) in the grid; None for a torch op (cuBLAS and aten choose their own)."""
        if self.grid is None:
            return None
        total = 1
        for g in self.grid:
            total *= g
        return total


def _source() -> str:
    """``module.function`` of the innermost ``fastpeft`` caller outside this module (a
    launcher, a torch path's function, or the plan's own glue for the ops' base GEMMs)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("fastpeft.") and module != __name__:
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def kernel_name(kernel: Any) -> str:
    """The Python name of a ``@triton.jit`` function (compiled or interpreted)."""
    return getattr(kernel, "fn", kernel).__name__


class _KernelStandIn:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            params = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            self.launches.append(Launch(kernel_name(self.kernel), _source(), tuple(int(g) for g in grid), params))

        return launch


def _is_kernel(name: str, value: Any) -> bool:
    return name.endswith("_kernel") and hasattr(value, "arg_names") and hasattr(value, "__getitem__")


class _TorchOps(TorchDispatchMode):
    """Appends a ``Launch`` for each recorded op (``RECORDED_NAMESPACES``) that launches work."""

    def __init__(self, launches: list[Launch]) -> None:
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = tuple(t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor))
        # Ops that return no tensor (dtype promotion, host reads) launch nothing either.
        launches_work = not (func.is_view or func.overloadpacket.__name__ in NO_LAUNCH_OPS)
        if outputs and func.namespace in RECORDED_NAMESPACES and launches_work:
            self.launches.append(Launch(str(func), _source(), op=func, inputs=(*args, *kwargs.values()),
                                        outputs=outputs))
        return out


def _mask_on_cuda(draw: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``draw(seed, rows, cols, p)`` run on a fake CUDA seed (its CUDA branch, recorded), its
    mask returned as a meta tensor for the meta tensors of the rest of the path."""

    def on_cuda(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
        with FakeTensorMode():
            keep = draw(torch.empty(1, dtype=torch.int64, device="cuda"), rows, cols, p)
        return torch.empty(keep.shape, dtype=keep.dtype, device="meta")

    return on_cuda


@contextlib.contextmanager
def _replaced(replacements: list[tuple[object, str, Any]]) -> Iterator[None]:
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, value in replacements:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def recording(gpu: GpuSpec) -> Iterator[list[Launch]]:
    """A context in which the launchers' launches are recorded as planned for ``gpu``; yields
    the list they are appended to (see the module docstring)."""
    for name in LAUNCH_MODULES + OP_MODULES:
        importlib.import_module(name)
    from fastpeft.kernels.lora import configs as lora_configs

    launches: list[Launch] = []
    on_gpu = (gpu.sms, gpu.capability)
    replacements: list[tuple[object, str, Any]] = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(("fastpeft.kernels.", "fastpeft.ops.")) or module is None:
            continue
        for name, value in list(vars(module).items()):
            if name == MASK_DRAWER and callable(value):
                replacements.append((module, name, _mask_on_cuda(value)))
            elif _is_kernel(name, value):
                replacements.append((module, name, _KernelStandIn(value, launches)))
            elif value is lora_configs.device_info:
                replacements.append((module, name, lambda device: on_gpu))
            elif value is backend.interpreting:
                replacements.append((module, name, lambda: False))

    with _LOCK, _replaced(replacements), _TorchOps(launches):
        yield launches
