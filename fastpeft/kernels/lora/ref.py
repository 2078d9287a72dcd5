"""Pure-PyTorch reference of the LoRA linear op: exactly HF PEFT's unmerged formula.

    y = F.linear(x, W, b) + scaling * F.linear(F.linear(dropout(x), A), B)

Shapes: x ``[..., K]``, W ``[N, K]``, b ``[N]`` or None, A ``[r, K]``, B ``[N, r]``;
y ``[..., N]``. Like PEFT, the LoRA branch runs in the LoRA weights' dtype (x is cast to
it) and its result is cast back to x's dtype before the add.

Tests use it (in float64) as the ground truth, benchmarks as the "naive PyTorch" baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` (unmerged, one adapter).

    ``dropout_mask`` (bool, broadcastable to x) replaces the random draw of ``F.dropout``:
    kept elements are scaled by ``1 / (1 - dropout_p)``, as ``F.dropout`` does. Tests pass
    the mask a kernel used, to check forward and backward against the same draw.
    """
    result = F.linear(x, weight, bias)
    x_lora = x.to(lora_a.dtype)
    if dropout_mask is not None:
        x_lora = x_lora * dropout_mask.to(x_lora.dtype) / (1.0 - dropout_p)
    elif training and dropout_p > 0.0:
        x_lora = F.dropout(x_lora, p=dropout_p, training=True)
    delta = F.linear(F.linear(x_lora, lora_a), lora_b) * scaling
    return result + delta.to(result.dtype)
