"""Run the CUDA launchers on CPU tensors through the kernels' CPU emulation (``*_emulated``).

``fastpeft._C``'s kernels are written once against a Block (``csrc/block.h``) and also run
on the CPU, block by block and thread by thread, on host memory. ``emulate_cuda_kernels``
points ``fastpeft.cuda_ext.load`` at a view of the module whose launch entry points are those
emulations, so the real launchers (``fastpeft.kernels.*.cuda_launch``) run end to end on CPU
tensors: argument plumbing, strides, workspaces and the kernels' own arithmetic.

The emulation also checks the block's barriers on shared memory (csrc/block.h: HostShared):
``barrier_sites`` lists every ``B::sync()`` of ``csrc/*.cu``, and ``dropped_barrier`` runs the
emulation as if one of them were removed.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import pytest

from fastpeft import check_cuda, cuda_ext

LAUNCHES = ("bottleneck_forward", "bottleneck_backward", "bgmv_forward")


def built_extension() -> types.ModuleType:
    """``fastpeft._C``, or skip the test when the install had no CUDA compiler."""
    try:
        return cuda_ext.extension()
    except RuntimeError as exc:
        pytest.skip(str(exc))


def emulate_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Make ``cuda_ext.load()`` return the extension with its launches emulated on the CPU
    (``stream_of`` and ``sm_count`` answer for a CPU tensor: stream 0, an H100's 132 SMs)."""
    ext = built_extension()
    shim = types.SimpleNamespace(**{name: getattr(ext, name) for name in dir(ext) if not name.startswith("_")})
    for name in LAUNCHES:
        setattr(shim, name, getattr(ext, f"{name}_emulated"))
    monkeypatch.setattr(cuda_ext, "load", lambda: shim)
    monkeypatch.setattr(cuda_ext, "stream_of", lambda tensor: 0)
    monkeypatch.setattr(cuda_ext, "sm_count", lambda device: 132)
    return shim


def barrier_sites() -> list[str]:
    """Every ``B::sync()`` call in ``csrc/*.cu``, as ``"file:line"`` (the emulation's name of it)."""
    return [
        f"{source.name}:{number}"
        for source in check_cuda.cuda_sources()
        for number, line in enumerate(source.read_text().splitlines(), 1)
        if "B::sync()" in line
    ]


@contextlib.contextmanager
def block_order(seed: int) -> Iterator[None]:
    """Run the emulation's blocks in a permutation drawn from ``seed`` (0: index order), as a
    GPU runs a grid's blocks in no set order (csrc/block.h: emulate_grid)."""
    ext = built_extension()
    ext.emulation_block_order(seed)
    try:
        yield
    finally:
        ext.emulation_block_order(0)


@contextlib.contextmanager
def dropped_barrier(site: str) -> Iterator[None]:
    """Run the emulation as if the ``B::sync()`` at ``site`` were removed, for the block."""
    ext = built_extension()
    ext.emulation_drop_barrier(site)
    try:
        yield
    finally:
        ext.emulation_drop_barrier("")
