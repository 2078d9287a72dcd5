"""Shared numerics of the tests: assertions over the per-dtype tolerance table and error
measures of ``fastpeft.tune.numerics`` (re-exported here: ``fastpeft tune`` validates a
user's GPU with the same table the tests use)."""

from __future__ import annotations

import torch

from fastpeft.tune.numerics import (
    ELEMENT_TOLERANCE,
    TOLERANCE,
    element_violations,
    magnitudes,
    relative_error,
)

__all__ = ["ELEMENT_TOLERANCE", "TOLERANCE", "assert_close", "assert_within_bound", "magnitudes", "relative_error"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Shapes equal and relative error within ``TOLERANCE[dtype]``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.1e} ({dtype})"


def assert_within_bound(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype,
                        what: str) -> None:
    """Element by element, ``|actual - expected| <= ELEMENT_TOLERANCE[dtype] * bound``.

    ``bound`` (float64, ``expected``'s shape) is the element's magnitude: the sum of the
    absolute values of the products its dot products add (``|x| @ |W|^T`` for ``x @ W^T``, see
    ``magnitudes``), which is what their rounding error scales with -- not the value itself,
    which cancellation can make arbitrarily small. Beside ``assert_close``'s norm-wise check,
    this catches one element that is far off: the norm of thousands of right elements
    hides it."""
    assert actual.shape == expected.shape == bound.shape, (what, actual.shape, expected.shape, bound.shape)
    count, first = element_violations(actual, expected, bound, dtype)
    if count:
        raise AssertionError(f"{what}: {count} element(s) off by more than {ELEMENT_TOLERANCE[dtype]:.1e} x their "
                             f"magnitude bound ({dtype}); {first}")
