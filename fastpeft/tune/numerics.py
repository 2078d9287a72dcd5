"""The per-dtype tolerances against a float64 reference and the error measures that use them:
one table for the test suite (``tests/helpers/numerics.py``) and for ``fastpeft tune``'s
validation on a user's GPU, so a kernel passes there exactly when it would pass the tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Largest allowed relative Frobenius error against a float64 reference, per compute dtype.
# About 4x the dtype's unit roundoff times a small accumulation factor: fp32 2^-24 (IEEE
# products, K <= a few hundred in the tests), fp16 2^-11, bf16 2^-8 (outputs are rounded to the
# dtype; LoRA weights are rounded to it inside the kernels).
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 1.6e-2,
    # float64 runs the same math as the float64 reference in another order: 2^-53 times a
    # small accumulation factor.
    torch.float64: 1e-12,
}

# Largest allowed |actual - expected| per element, in units of the element's magnitude bound
# (``element_violations``), per compute dtype. 16-bit: 4 unit roundoffs (an output rounded once
# to the dtype, a rank-r intermediate rounded once, and margin; the LoRA, bottleneck and decode
# tests measure at most 1.5u in fp16 and 1.3u in bf16). fp32: 32u, as its error is the fp32
# accumulation's and grows with K (at most 4.4u measured, K <= 200). float64: about TOLERANCE's.
ELEMENT_TOLERANCE = {
    torch.float32: 2.0**-19,
    torch.float16: 2.0**-9,
    torch.bfloat16: 2.0**-6,
    torch.float64: 2.0**-40,
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


def max_row_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest per-row relative error, ``max_i max_j |a_ij - e_ij| / max_j |e_ij|`` over the
    rows of the last dimension (float64; inf for a non-finite element): one wrong row among
    thousands shows here, where a norm over the whole tensor hides it."""
    actual = actual.detach().double().reshape(-1, actual.shape[-1] if actual.dim() else 1)
    expected = expected.detach().double().reshape(actual.shape)
    if not torch.isfinite(actual).all():
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    scale = expected.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return ((actual - expected).abs().amax(dim=1) / scale).max().item()


def element_violations(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor,
                       dtype: torch.dtype) -> tuple[int, str]:
    """``(count, first)``: how many elements break ``|actual - expected| <= ELEMENT_TOLERANCE[dtype]
    * bound`` and a description of the first (``""`` when none). ``bound`` (float64,
    ``expected``'s shape) is the element's magnitude: the sum of the absolute values of the
    products its dot products add (``magnitudes``), which its rounding error scales with -- not
    the value itself, which cancellation can make arbitrarily small."""
    actual, expected, bound = (t.detach().cpu().double() for t in (actual, expected, bound))
    if not torch.isfinite(actual).all():
        return int((~torch.isfinite(actual)).sum()), "non-finite elements"
    err = (actual - expected).abs()
    limit = ELEMENT_TOLERANCE[dtype] * bound
    bad = err > limit
    if not bad.any():
        return 0, ""
    i = int(bad.flatten().nonzero()[0])
    return int(bad.sum()), (f"first at flat index {i}: |{actual.flatten()[i].item():.6g} - "
                            f"{expected.flatten()[i].item():.6g}| > {limit.flatten()[i].item():.3e}")


def magnitudes(reference: Callable[..., torch.Tensor], inputs: Sequence[object],
               grad_out: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """The magnitude bounds of a multilinear op's output and gradients: ``reference`` (a
    float64 function of ``inputs`` built from products and sums only, e.g. ``x W^T + b +
    s x A^T B^T``) evaluated on the inputs' absolute values, and its gradients for ``|grad_out|``
    (None for an input that is None or not floating point). Every sum then adds the absolute
    values of its terms: for ``x @ W^T`` that is ``|x| @ |W|^T``."""
    leaves = [t.detach().double().abs().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for t in inputs]
    out = reference(*leaves)
    if grad_out is None:
        return out.detach(), []
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out.detach().double().abs(), allow_unused=True))
    return out.detach(), [next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
