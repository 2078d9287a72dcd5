"""Counter-based dropout masks, in plain torch: the bits the Triton kernels draw.

Element ``(m, k)`` of an ``M x K`` activation is kept iff ``(u >> 1) >= threshold`` where
``u`` is lane ``k % 4`` of Philox4x32 (Triton's ``tl.randint4x``) evaluated at counter
``m * ceil(K / 4) + k // 4`` with the op's 64-bit seed, and ``threshold = round(p * 2**31)``.
One Philox call thus serves four neighbouring columns.

Because the mask is a pure function of (seed, m, k), the backward regenerates it instead of
saving it, and the torch path produces bit-identical masks to the kernels
(``fastpeft.kernels.philox_dropout``), so a seed means the same dropout on every device.
"""

from __future__ import annotations

import torch

# Philox4x32 with 7 rounds: Salmon et al. (SC'11, "Parallel random numbers: as easy as
# 1, 2, 3") report Philox4x32-7 passes all of TestU01's BigCrush; 10 (Triton's default)
# only adds margin, and each round is ~8 integer ops per 4 elements on a hot path.
PHILOX_ROUNDS = 7

# Philox4x32 round and key constants (Salmon et al.; identical to Triton's and cuRAND's).
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def dropout_threshold(p: float) -> int:
    """The 31-bit integer threshold for drop probability ``p`` (keep iff ``u31 >= it``)."""
    return int(round(p * 2**31))


def _philox4x32(c0: torch.Tensor, c1: torch.Tensor, seed: torch.Tensor, rounds: int) -> list[torch.Tensor]:
    """Philox4x32 on int64 tensors holding uint32 values (c2 = c3 = 0), as Triton computes it.

    ``seed`` is a 1-element int64 tensor on the counters' device (read there, no host sync).
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        # A 32x32-bit product fits in 64 bits; int64 wraps, and bits 32..63 stay exact.
        prod_b = c2 * _ROUND_B
        prod_a = c0 * _ROUND_A
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _MASK32) ^ c1 ^ k0,
            prod_b & _MASK32,
            ((prod_a >> 32) & _MASK32) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def keep_mask_torch(seed: torch.Tensor | int, rows: int, cols: int, p: float) -> torch.Tensor:
    """The bool keep-mask ``[rows, cols]`` that ``keep_mask`` draws, computed with torch ops.

    ``seed``: an int, or a 1-element int64 tensor (the mask is then made on its device).
    """
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1)
    k4 = (cols + 3) // 4
    counter = torch.arange(rows * k4, dtype=torch.int64, device=seed.device)
    lanes = _philox4x32(counter & _MASK32, counter >> 32, seed, PHILOX_ROUNDS)
    bits = torch.stack(lanes, dim=-1).reshape(rows, k4 * 4)[:, :cols]
    return (bits >> 1) >= dropout_threshold(p)
