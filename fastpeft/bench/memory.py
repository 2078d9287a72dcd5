"""Activation memory an implementation saves for backward, measured with saved-tensor hooks.

Every tensor autograd saves during the forward goes through
``torch.autograd.graph.saved_tensors_hooks``; the accounting counts each underlying storage
once (views and repeated saves of one tensor cost nothing extra) and leaves out the storages
of the weights and of the input x, which exist whether or not backward runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# A saved storage of at most this many elements counts as scalars (a 0-d tensor, or the
# (seed, offset) pair a dropout kernel keeps to regenerate its mask), not as an activation.
SCALAR_MAX_ELEMENTS = 2


@dataclass(frozen=True)
class SavedActivations:
    """What one forward saved for backward, beyond the weights and x.

    ``bytes``: total bytes of the unique storages. ``elements``: their elements, leaving out
    scalar storages and bool ones. ``storages``: how many unique storages (scalars included).
    ``mask_bytes``: bytes of bool storages (a dropout keep-mask, one byte per element).
    """

    bytes: int
    elements: int
    storages: int
    mask_bytes: int = 0


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def measure_saved_activations(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, owned: Iterable[torch.Tensor]
) -> SavedActivations:
    """Run ``forward(x)`` once and account what it saves for backward (x and ``owned`` excluded).

    ``x`` must require grad for the forward to save what its backward needs.
    """
    excluded = {_storage_key(t) for t in (x, *owned)}
    saved: dict[tuple[str, int], tuple[int, int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded and key not in saved:
            nbytes = t.untyped_storage().nbytes()
            saved[key] = (nbytes, nbytes // t.element_size(), t.dtype == torch.bool)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x)
    return SavedActivations(
        bytes=sum(nbytes for nbytes, _, _ in saved.values()),
        elements=sum(n for _, n, is_mask in saved.values() if n > SCALAR_MAX_ELEMENTS and not is_mask),
        storages=len(saved),
        mask_bytes=sum(nbytes for nbytes, _, is_mask in saved.values() if is_mask),
    )


def saved_elements_limit(m: int, r: int) -> int:
    """The criterion: beyond x, at most the rank-r intermediate ``s = x_hat A^T`` [M, r] (plus
    scalars and the mask below)."""
    return m * r


def saved_mask_bytes_limit(m: int, k: int) -> int:
    """...and at most a one-byte-per-element ``[M, K]`` dropout keep-mask (the torch path keeps
    one instead of drawing it twice; the kernels keep none). PEFT keeps a copy of x instead."""
    return m * k
