"""Adapter slots of the multi-LoRA decode kernels (csrc/bgmv.cu) with NaN in their padding,
and the per-token float64 reference of the decode, for the CPU emulation's tests and the GPU's."""

from __future__ import annotations

import torch

from fastpeft.kernels.multi_lora.cuda_launch import multi_lora_decode
from tests.helpers.numerics import assert_close, assert_within_bound


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


def check_decode_case(num_tokens, k, n, dtype, lora_dtype):
    """``multi_lora_decode`` on CPU tensors (the launches emulated, tests/helpers/cuda_emulation.py)
    against ``decode_reference``: 4 slots of ranks 3, 24, 40 (clamped to R_max 24) and 0, ids
    repeated and interleaved with -1 and out-of-range ones, x and y row-strided views; rows
    without a valid id must come back bit for bit unchanged."""
    g = torch.Generator().manual_seed(num_tokens)
    num_slots, r_max = 4, 24
    # Heterogeneous ranks, one past R_max (clamped) and one 0 (adds nothing).
    ranks = torch.tensor([3, 24, 40, 0], dtype=torch.int64)
    lora_a, lora_b = padded_slots(num_slots, r_max, k, n, ranks, lora_dtype, g)
    scalings = torch.tensor([0.5, 2.0, 1.25, 3.0], dtype=torch.float32)
    # Repeated and interleaved ids, -1 (base only) and out-of-range ids on both sides.
    pattern = torch.tensor([2, -1, 0, 1, num_slots, 2, 3, -7, 1, 0], dtype=torch.int64)
    adapter_ids = pattern.repeat(num_tokens // len(pattern) + 1)[:num_tokens]
    if num_tokens == 1:
        adapter_ids = torch.tensor([1])
    # x and y as row-strided views (unit column stride), as the contract allows.
    x = torch.randn(num_tokens, k + 3, generator=g).to(dtype)[:, :k]
    y = torch.randn(num_tokens, n + 5, generator=g).to(dtype)[:, 2 : n + 2]
    y_before = y.clone()
    expected = decode_reference(y, x, lora_a, lora_b, scalings, adapter_ids, ranks)
    multi_lora_decode(y, x, lora_a, lora_b, scalings, adapter_ids, ranks)
    untouched = (adapter_ids < 0) | (adapter_ids >= num_slots)
    assert torch.equal(y[untouched], y_before[untouched]), "a row without a valid adapter id was written"
    assert_close(y, expected, dtype, "y")
    # The magnitude bound: the reference on absolute values (sums of |products|).
    bound = decode_reference(y_before.abs(), x.abs(), lora_a.abs(), lora_b.abs(), scalings.abs(), adapter_ids, ranks)
    assert_within_bound(y, expected, bound, dtype, "y")
