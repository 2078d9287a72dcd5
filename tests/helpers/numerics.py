"""Shared numerics of the tests: the per-dtype tolerance table and relative-error checks."""

from __future__ import annotations

import torch

# Largest allowed relative Frobenius error against a float64 reference, per compute dtype.
# About 4x the dtype's unit roundoff times a small accumulation factor: fp32 2^-24 (IEEE
# products, K <= a few hundred here), fp16 2^-11, bf16 2^-8 (outputs are rounded to the
# dtype; LoRA weights are rounded to it inside the kernels).
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 1.6e-2,
    # float64 runs the same math as the float64 reference in another order: 2^-53 times a
    # small accumulation factor.
    torch.float64: 1e-12,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (inf if actual has NaN/inf)."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Shapes equal and relative error within ``TOLERANCE[dtype]``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.1e} ({dtype})"
