"""Tensors as the adapter savers hand them to safetensors (PEFT, AdapterHub and prompt files,
and fastpeft's own encoder file): detached, on the CPU, contiguous, sharing no storage with the
model (safetensors refuses shared or strided storage)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy of ``t``."""
    return t.detach().to("cpu", copy=True).contiguous()


def cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cpu_copy`` of every value, keys and order kept."""
    return {key: cpu_copy(value) for key, value in tensors.items()}
