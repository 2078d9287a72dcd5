"""Per-token pure-PyTorch reference of the multi-adapter LoRA linear op.

    y[t] = x[t] W^T + b + scalings[i] * (x[t] A_i[:r_i]^T) B_i[:, :r_i]^T,   i = adapter_ids[t]

Shapes: x ``[T, K]`` (or ``[..., K]`` with ``adapter_ids`` of x's leading shape), W ``[N, K]``,
b ``[N]`` or None, ``lora_a [L, R_MAX, K]``, ``lora_b [L, N, R_MAX]``, ``scalings [L]``,
``ranks [L]`` (None: every slot uses R_MAX). Tokens whose id is ``-1`` get the base only. As
PEFT, the LoRA branch runs in the adapters' dtype and is added to the base in x's dtype.

One token at a time, literally the formula: the tests' ground truth (in float64) and the
slowest possible baseline. Any id outside ``[-1, L)`` raises, as the op does on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's result, computed per token (see the module docstring)."""
    num_slots, r_max, k = lora_a.shape
    rows = x.reshape(-1, k)
    ids = adapter_ids.reshape(-1).tolist()
    rank_list = [r_max] * num_slots if ranks is None else ranks.tolist()
    base = F.linear(rows, weight, bias)
    out = []
    for t, i in enumerate(ids):
        if not -1 <= i < num_slots:
            raise ValueError(f"adapter id {i} at token {t} is outside [-1, {num_slots})")
        y = base[t]
        if i >= 0:
            r = rank_list[i]
            a, b = lora_a[i, :r], lora_b[i, :, :r]
            delta = F.linear(F.linear(rows[t].to(a.dtype), a), b) * scalings[i].to(a.dtype)
            y = y + delta.to(y.dtype)
        out.append(y)
    y = torch.stack(out) if out else base
    return y.reshape(*x.shape[:-1], weight.shape[0])
