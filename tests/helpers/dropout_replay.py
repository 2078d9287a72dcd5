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

from fastpeft.ops.dropout import mask_follows_seed


def replayed_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float,
                       rebuild: Callable[[torch.Tensor, int, int, float], torch.Tensor]) -> torch.Tensor:
    """The bool ``[rows, cols]`` keep-mask of the op call that drew ``seed``: ``rebuild``
    (the op's ``*_dropout_mask``) where the mask follows the seed, else the next draw of
    torch's CUDA generator (call this right after replaying the seed's draw)."""
    if mask_follows_seed(seed.device):
        return rebuild(seed, rows, cols, p)
    return torch.empty((rows, cols), dtype=torch.bool, device=seed.device).bernoulli_(1.0 - p)
