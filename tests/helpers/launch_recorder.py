"""Kernel launches recorded instead of run, and reduced to what ``fastpeft check`` compiles.

``record_launches`` replaces the kernels of launcher modules with ``Recorder`` s, so the
launchers run (on meta tensors, nothing computed) and leave the launches they would make, and
their grids.
``launch_key`` reduces a launch to what Triton's launcher specializes on -- argument types,
integers equal to 1 (constexprs) or divisible by 16 and 16-byte aligned pointers, except the
arguments the kernel exempts (``do_not_specialize``) -- plus its constexprs, warps and
stages and FP fusion; ``spec_key`` keys a compiled spec the same way, so a launch is checked when its key
is a spec's.
"""

from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from fastpeft.kernels.aot_spec import unspecialized_args

# (SM count, capability) of an A100 and an H100/H200.
GPUS = [(108, 80), (132, 90)]

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                 torch.uint8: "u8", torch.int8: "i8"}


def _name(fn) -> str:
    return getattr(fn, "fn", fn).__name__


def spec_key(spec) -> tuple:
    """What a compiled spec specializes on, keyed like ``launch_key``."""
    return (_name(spec.fn), tuple(spec.signature.items()), tuple(sorted(spec.constexprs.items())),
            tuple(sorted(spec.aligned_params())), spec.num_warps, spec.num_stages, spec.enable_fp_fusion)


def launch_key(fn, args: tuple, kwargs: dict) -> tuple:
    """What Triton's launcher would compile for this launch, keyed like ``spec_key``."""
    exempt = set(unspecialized_args(fn))
    kwargs = dict(kwargs)
    warps, stages = kwargs.pop("num_warps"), kwargs.pop("num_stages")
    fp_fusion = kwargs.pop("enable_fp_fusion", True)
    values = dict(zip(fn.arg_names, args))
    signature, constexprs, aligned = {}, dict(kwargs), []
    for name in fn.arg_names:
        value = values.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            if value.storage_offset() * value.element_size() % 16 == 0:  # torch's allocations are aligned
                aligned.append(name)
        elif isinstance(value, TensorDescriptor):  # a host-side TMA descriptor: its type and block
            block = ", ".join(str(b) for b in value.block_shape)
            signature[name] = f"tensordesc<{_TRITON_TYPES[value.base.dtype]}[{block}]>"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif name not in exempt and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            assert isinstance(value, int) and abs(value) < 2**31, (name, value)
            signature[name] = "i32"
            if name not in exempt and value % 16 == 0:
                aligned.append(name)
    return (_name(fn), tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(aligned)),
            warps, stages, fp_fusion)


class Launches(list):
    """The recorded ``(fn, args, kwargs)`` launches, with each one's grid in ``grids`` (same order)."""

    def __init__(self) -> None:
        super().__init__()
        self.grids: list[tuple[int, ...]] = []

    def clear(self) -> None:
        super().clear()
        self.grids.clear()


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches: Launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))
            self.launches.grids.append(tuple(grid))

        return launch


def record_launches(monkeypatch, *modules) -> Launches:
    """Replace every ``*_kernel`` of the launcher ``modules`` with a ``Recorder``; returns the
    list their launches are appended to (their grids in its ``grids``)."""
    launches = Launches()
    for module in modules:
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Recorder(getattr(module, name), launches))
    return launches
