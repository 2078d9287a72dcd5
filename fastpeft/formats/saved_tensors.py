"""Tensors as the adapter savers hand them to safetensors (PEFT, AdapterHub and prompt files,
and fastpeft's own encoder file): detached, on the CPU, contiguous, sharing no storage with the
model (safetensors refuses shared or strided storage); and the dtype rule every loader
applies to the tensors it reads (``check_dtype``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy of ``t``."""
    return t.detach().to("cpu", copy=True).contiguous()


def cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cpu_copy`` of every value, keys and order kept."""
    return {key: cpu_copy(value) for key, value in tensors.items()}


def check_dtype(tensor: torch.Tensor, expected: torch.dtype | None, key: str, source: str) -> None:
    """A loaded tensor's dtype rule: where the adapter holds floating point (``expected``
    None or a floating dtype: LoRA / adapter weights, prompts) any floating dtype is taken
    and cast, as PEFT does; an integer or bool tensor there would be cast silently, so it
    is refused. A non-floating ``expected`` (an integer buffer of a ``modules_to_save``
    module) must match exactly.

    Raises:
        ValueError: naming ``source`` (the file), ``key``, the dtype and what was expected.
    """
    floating = expected is None or expected.is_floating_point
    if tensor.dtype.is_floating_point != floating or (not floating and tensor.dtype != expected):
        raise ValueError(f"{source}: {key!r} has dtype {tensor.dtype}, expected "
                         f"{'a floating point dtype' if floating else expected}")
