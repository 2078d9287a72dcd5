"""Dropout keep-masks of the LoRA op, in plain torch, regenerated from a seed.

The Triton kernels draw counter-based masks:

Element ``(m, k)`` of an ``M x K`` activation is kept iff ``(u >> 1) >= threshold`` where
``u`` is lane ``k % 4`` of Philox4x32 (Triton's ``tl.randint4x``) evaluated at counter
``m * ceil(K / 4) + k // 4`` with the op's 64-bit seed, and ``threshold = round(p * 2**31)``.
One Philox call thus serves four neighbouring columns.

``keep_mask_philox`` computes those bits with torch ops: it is the reference the kernels'
mask is tested against, and their mask under Triton's interpreter. On the CPU, Philox in
torch ops costs tens of passes over the mask, so the torch backend draws CPU masks from
torch's CPU generator seeded with the op's seed instead (``keep_mask_cpu``) -- like torch's own
CPU and CUDA RNGs, CPU and GPU then drop different elements for one seed. Which mask an op
draws where is ``fastpeft.ops.dropout``'s choice.
"""

from __future__ import annotations

import torch

# Seeds are drawn in [0, 2**62): non-negative int64 values, which the kernels' Philox key
# reads as 64 bits.
_SEED_BOUND = 2**62

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


def keep_mask_philox(seed: torch.Tensor | int, rows: int, cols: int, p: float) -> torch.Tensor:
    """The bool keep-mask ``[rows, cols]`` the Triton kernels draw, computed with torch ops.

    ``seed``: an int, or a 1-element int64 tensor (the mask is then made on its device).
    """
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1)
    k4 = (cols + 3) // 4
    counter = torch.arange(rows * k4, dtype=torch.int64, device=seed.device)
    lanes = _philox4x32(counter & _MASK32, counter >> 32, seed, PHILOX_ROUNDS)
    bits = torch.stack(lanes, dim=-1).reshape(rows, k4 * 4)[:, :cols]
    return (bits >> 1) >= dropout_threshold(p)


def keep_mask_cpu(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """A bool keep-mask ``[rows, cols]`` from torch's CPU generator seeded with ``seed``.

    Uniform 31-bit integers against the kernels' threshold: the same keep probability as
    the Philox masks, and cheaper than drawing floats (``random_`` on int32 fills
    ``[0, 2**31)``).
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed.item()))
    bits = torch.empty((rows, cols), dtype=torch.int32).random_(generator=generator)
    return bits >= dropout_threshold(p)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A 1-element int64 dropout seed drawn on ``device`` from torch's default generator
    for that device (so ``torch.manual_seed`` makes dropout reproducible; no host sync)."""
    return torch.randint(0, _SEED_BOUND, (1,), device=device, dtype=torch.int64)
