"""Rebuilding the dropout mask an op call drew, on every device and backend.

Where the op's mask follows its seed (the kernels' Philox bits; torch's CPU generator seeded
with it) the op's own ``*_dropout_mask(seed, ...)`` rebuilds it. On CUDA without the kernels
the torch path draws it from torch's CUDA generator right after the seed
(``fastpeft.ops.dropout``), so a test that replayed the generator up to the seed (the same
``torch.manual_seed`` and ``draw_seed``) gets it as the generator's next Bernoulli draw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastpeft.backend import use_triton
from fastpeft.kernels.dropout_mask import keep_mask_philox
from fastpeft.ops.dropout import mask_follows_seed


def replayed_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float,
                       rebuild: Callable[[torch.Tensor, int, int, float], torch.Tensor]) -> torch.Tensor:
    """The bool ``[rows, cols]`` keep-mask of the op call that drew ``seed``: ``rebuild``
    (the op's ``*_dropout_mask``) where the mask follows the seed, else the next draw of
    torch's CUDA generator (call this right after replaying the seed's draw)."""
    if mask_follows_seed(seed.device):
        return rebuild(seed, rows, cols, p)
    return torch.empty((rows, cols), dtype=torch.bool, device=seed.device).bernoulli_(1.0 - p)


def independent_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The keep-mask the op's contract gives for ``seed`` where it follows the seed, computed
    by code the op's torch path does not call, to check the mask it returns against:

    - where the kernels are in use, the kernels' Philox mask from the other implementation: on
      CUDA the torch-ops one (``keep_mask_philox``; the op draws it with the Triton mask
      kernel there), elsewhere the Triton mask kernel, interpreted (the op uses the torch ops);
    - on CPU without the kernels, torch's CPU generator seeded with the seed, 31-bit integers
      kept iff ``>= round(p * 2**31)``, written out here (``fastpeft.kernels.dropout_mask``'s
      module docstring).
    """
    if use_triton(seed.device):
        if seed.device.type == "cuda":
            return keep_mask_philox(seed, rows, cols, p)
        from fastpeft.kernels.lora.launch import dropout_keep_mask

        return dropout_keep_mask(seed, rows, cols, p)
    assert seed.device.type == "cpu", "the torch path on CUDA draws its mask from torch's CUDA generator"
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed.item()))
    bits = torch.empty((rows, cols), dtype=torch.int32).random_(generator=generator)
    return bits >= int(round(p * 2**31))
