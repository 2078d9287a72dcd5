"""``torch.autocast`` for fastpeft's ops, with the rules ``F.linear`` gets.

Inside an autocast region for the tensors' device type, an op of the "lower precision"
class (``F.linear``, ``matmul``) casts each floating input that is not float64 to the
region's dtype and runs in it; the casts are differentiable, so gradients come back in
the parameters' own dtypes. PEFT's LoRA layer is made of such ops, so under autocast its
base GEMM and its LoRA branch (fp32 LoRA weights included) both run in the autocast
dtype, and so does its output. fastpeft's ops do the same by casting their inputs here and
running their implementation with autocast off (custom ops are not cast by autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The dtypes autocast casts (as its ``is_eligible``): floating point, except float64.
_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region enabled for ``device_type``, or None outside one and
    for device types autocast does not know (``meta``: there ``torch.is_autocast_enabled``
    raises, while ``F.linear`` on meta tensors is never cast)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_for_autocast(dtype: torch.dtype, *tensors: object) -> tuple:
    """Each argument that is a tensor of an eligible dtype cast to ``dtype`` (differentiably);
    everything else (None, float64, non-tensors, left for the op's checks) as it is."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _ELIGIBLE else t for t in tensors)


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Run an op's implementation on inputs already cast, without autocast re-casting
    the torch ops inside it (``s`` and other fp32 intermediates stay fp32)."""
    with torch.autocast(device_type, enabled=False):
        yield
