"""Pure-PyTorch reference of the bottleneck adapter op (Houlsby / Pfeiffer adapters).

    out = residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)

Shapes: h ``[..., D]``, w_down ``[R, D]``, b_down ``[R]`` or None, w_up ``[D, R]``, b_up
``[D]`` or None, residual like h (defaults to h), scaling a float or a tensor broadcastable to
``[D]`` (AdapterHub's ``scaling="learned"`` is a 1-element parameter); out like h.

Dtypes: the bottleneck branch runs in the adapter weights' dtype (h is cast to it, as PEFT
does for LoRA; an fp32 adapter on a 16-bit model thus computes its branch in fp32) and its
result is cast to h's dtype before the residual add. Activation names are AdapterHub's (which
are transformers' ``ACT2FN`` names); see ``ACTIVATIONS``.

Tests use it (in float64) as the ground truth, benchmarks as the "naive PyTorch" baseline:
it is the computation of AdapterHub's ``Adapter`` module (two ``nn.Linear``, an activation, a
scale and a residual add) with dropout on the input instead of the output (see
``bottleneck_adapter_ref``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _gelu_erf(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z)


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z, approximate="tanh")


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


# Canonical activation name -> function. The kernels implement exactly these five.
CANONICAL_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": _gelu_erf,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "identity": _identity,
}

# Accepted names (lower-cased, as AdapterHub lower-cases ``non_linearity``) -> canonical name.
# AdapterHub resolves names through transformers' ACT2FN: "gelu" is the erf GELU, "gelu_new",
# "gelu_pytorch_tanh" and "gelu_fast" are the tanh approximation (gelu_fast's constant folding
# differs from gelu_new's only in rounding), "swish" is SiLU, "linear" the identity.
ACTIVATIONS: dict[str, str] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "linear": "identity",
    "identity": "identity",
}


def canonical_activation(name: str) -> str:
    """The canonical name (a key of ``CANONICAL_ACTIVATIONS``) for an accepted activation name
    (case-insensitive). Raises ValueError naming the accepted names otherwise."""
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(
            f"bottleneck_adapter: unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name.lower()]


def bottleneck_adapter_ref(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
    scaling: float | torch.Tensor = 1.0,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)``.

    ``dropout_mask`` (bool, broadcastable to h) replaces the random draw of ``F.dropout``:
    kept elements are scaled by ``1 / (1 - dropout_p)``, as ``F.dropout`` does. Tests pass
    the mask an implementation used, to check forward and backward against the same draw.
    (AdapterHub applies its dropout to the adapter's output rather than its input; both are
    the identity outside training.) ``activation`` is a name or a function: tests pass their
    own, so that the reference shares no activation code with the torch path.
    """
    act = activation if callable(activation) else CANONICAL_ACTIVATIONS[canonical_activation(activation)]
    h_branch = h.to(w_down.dtype)
    if dropout_mask is not None:
        h_branch = h_branch * dropout_mask.to(h_branch.dtype) / (1.0 - dropout_p)
    elif training and dropout_p > 0.0:
        h_branch = F.dropout(h_branch, p=dropout_p, training=True)
    up = F.linear(act(F.linear(h_branch, w_down, b_down)), w_up, b_up)
    delta = up * scaling
    base = h if residual is None else residual
    return base + delta.to(base.dtype)


__all__ = ["ACTIVATIONS", "CANONICAL_ACTIVATIONS", "bottleneck_adapter_ref", "canonical_activation"]
