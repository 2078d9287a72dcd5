"""Where kernel launches happen and what they write into.

Triton launches a kernel on ``torch.cuda.current_device()``, not on its arguments' device.
With a model spread over several GPUs (``device_map="auto"``), a layer's tensors may live
on ``cuda:1`` while the current device is ``cuda:0``: the kernel would then run on the wrong
GPU and fault on foreign pointers. Every launcher wraps its launches in ``on_device_of``.

Every launcher (all op families) allocates the buffers its kernels fully overwrite through
``empty_output``, called as ``launch_device.empty_output`` so the tests can poison it with NaN
(``tests/conftest.py``): an element a kernel forgets to write then shows in every comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def on_device_of(tensor: torch.Tensor) -> Iterator[None]:
    """Make ``tensor``'s CUDA device the current one for the block (nothing for CPU
    tensors, which only the interpreter runs)."""
    if tensor.device.type != "cuda":
        yield
        return
    with torch.cuda.device(tensor.device):
        yield


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized buffer a kernel will fully overwrite (tests replace this with NaN fill)."""
    return torch.empty(shape, dtype=dtype, device=device)
