"""Adapter slots of the multi-LoRA decode kernels (csrc/bgmv.cu) with NaN in their padding,
and the per-token float64 reference of the decode, for the CPU emulation's tests and the GPU's."""

from __future__ import annotations

import torch


def padded_slots(num_slots, r_max, k, n, ranks, dtype, generator):
    """lora_a [L, R_max, K], lora_b [L, N, R_max] with NaN past each slot's clamped rank."""
    lora_a = torch.randn(num_slots, r_max, k, generator=generator) / k**0.5
    lora_b = torch.randn(num_slots, n, r_max, generator=generator) / r_max**0.5
    for i, rank in enumerate(ranks.clamp(0, r_max).tolist()):
        lora_a[i, rank:] = float("nan")
        lora_b[i, :, rank:] = float("nan")
    return lora_a.to(dtype), lora_b.to(dtype)


def decode_reference(y, x, lora_a, lora_b, scalings, adapter_ids, ranks):
    """float64 ``y[t] + s_i x[t] A_i[:r]^T B_i[:, :r]^T`` for ids in [0, L), else y[t]."""
    out = y.double().clone()
    for t, i in enumerate(adapter_ids.tolist()):
        if 0 <= i < lora_a.shape[0]:
            r = min(max(int(ranks[i]), 0), lora_a.shape[1])
            a, b = lora_a[i, :r].double(), lora_b[i, :, :r].double()
            out[t] += float(scalings[i]) * (x[t].double() @ a.t() @ b.t())
    return out
