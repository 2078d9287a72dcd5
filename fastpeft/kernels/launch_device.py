"""Where kernel launches happen, what they write into, and the launch arguments every op
family computes the same way (``kernel_numerics``, ``dropout_args``).

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

from fastpeft.backend import interpreting
from fastpeft.kernels.dropout_mask import dropout_threshold


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


def kernel_numerics(dtype: torch.dtype, lora_dtype: torch.dtype) -> dict:
    """Constexprs fixing how the GEMM kernels' tiles meet the tensor cores: activation tiles
    of ``dtype``, adapter-weight tiles of ``lora_dtype`` (``tile_utils.to_compute``).

    fp16 and bf16 use their own tensor-core path with fp32 accumulation; fp32 activations
    get IEEE products (LoRA sends them to the torch path on a GPU). Under the interpreter,
    everything is computed in fp32 when bf16 is involved (its bf16 arithmetic is wrong;
    KERNEL_NOTES.md).
    """
    upcast = interpreting() and torch.bfloat16 in (dtype, lora_dtype)
    return {"UPCAST": upcast, "PRECISION": "ieee" if (dtype == torch.float32 or upcast) else "tf32"}


def dropout_args(dropout_p: float) -> tuple[int, float]:
    """The kernels' dropout arguments: the keep threshold of the Philox draw
    (``fastpeft.kernels.dropout_mask.dropout_threshold``; 0 = no dropout) and ``1 / (1 - p)``."""
    if dropout_p == 0.0:
        return 0, 1.0
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
