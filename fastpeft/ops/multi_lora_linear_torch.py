"""The torch path of the multi-adapter LoRA op: CPU tensors, float64, and the default on CUDA
until the kernels have run on a GPU (``fastpeft.backend``).

Same contract as the kernels' launchers (``fastpeft.kernels.multi_lora.launch``): the LoRA
term is added into y (which holds the base ``x W^T + b``) in place; ids outside ``[0, L)``
mean no adapter; slot i uses its first ``ranks[i]`` ranks (clamped to ``[0, R_MAX]``). The
rank-r side runs in the adapters' dtype and each token's delta is rounded once to y's dtype
and added, as PEFT's mixed batch does.

Grouped (CPU, and CUDA outside graph capture): tokens are sorted by adapter and the group
sizes read on the host; the rows of the tokens with an adapter are gathered once, each
adapter runs two GEMMs on its contiguous block of rows at its own rank (slices of its slot:
no copy of any weight, nothing past the rank read), and the deltas are scattered into y with
one ``index_add_``. PEFT's mixed batch instead masks, gathers and scatters per adapter. (A
padded ``bmm`` over gathered slots was tried: copying the slots cost more than the loop.)

Per-token (CUDA graph capture, where nothing may be read on the host): each token gathers its
slot's ``A`` and ``B`` and runs two batched vector products over ``R_MAX``, masked by rank, in
chunks of ``_GATHER_CHUNK`` tokens (bounding the gathered copies); the padding past each
rank is masked out (never used, whatever it holds).

The backward loops over the adapters present (grouped; it reads group sizes on the host):
each adapter's dA and dB are written by one GEMM over its tokens in token order, so the
result is deterministic. Everything is plain torch ops, so autograd can differentiate the
backward (``create_graph=True``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastpeft.ops.op_calls import as_dtype

# Tokens per chunk of the per-token path: 256 tokens x rank 64 x K 4096 x 2 bytes gathers
# 128 MB of A rows; smaller chunks cost more launches.
_GATHER_CHUNK = 256
# Up to this many CPU tokens (decode steps, a few short requests) the tokens are grouped by
# adapter in Python from one host copy of the ids: a list read and a dict cost less than the
# sort-based grouping's ~8 torch calls (~40 us, most of a decode step's LoRA term). Above it
# the per-token Python loop would grow past the sort's cost.
HOST_GROUPING_MAX_TOKENS = 64


class Group(NamedTuple):
    """One adapter's tokens: its slot, its rank and its token indices (in token order)."""

    slot: int
    rank: int
    tokens: torch.Tensor


def host_groups_allowed(device: torch.device) -> bool:
    """Whether the group sizes may be read on the host: always on CPU, on CUDA except while a
    CUDA graph is being captured."""
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def clamped_ranks(ranks: torch.Tensor, r_max: int) -> torch.Tensor:
    """``ranks`` clamped to ``[0, R_MAX]`` (the kernels' semantics)."""
    return ranks.clamp(0, r_max)


def adapter_groups(adapter_ids: torch.Tensor, ranks: torch.Tensor, r_max: int) -> list[Group]:
    """The adapters present in ``adapter_ids [T]`` (ids outside ``[0, L)`` skipped), in slot
    order, each with its tokens in token order. Reads the group sizes on the host."""
    num_slots = ranks.shape[0]
    rank_list = clamped_ranks(ranks, r_max).tolist()
    if adapter_ids.device.type == "cpu" and adapter_ids.shape[0] <= HOST_GROUPING_MAX_TOKENS:
        by_slot: dict[int, list[int]] = {}
        for token, slot in enumerate(adapter_ids.tolist()):
            if 0 <= slot < num_slots and rank_list[slot] > 0:
                by_slot.setdefault(slot, []).append(token)
        return [Group(slot, rank_list[slot], torch.tensor(by_slot[slot], dtype=torch.int64))
                for slot in sorted(by_slot)]
    ids = adapter_ids.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < num_slots), ids, num_slots)
    sorted_key, order = torch.sort(key, stable=True)
    slots, counts = torch.unique_consecutive(sorted_key, return_counts=True)
    groups, start = [], 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        if slot < num_slots and rank_list[slot] > 0:
            groups.append(Group(slot, rank_list[slot], order[start:start + count]))
        start += count
    return groups


def _add_rows(out: torch.Tensor, tokens: torch.Tensor, delta: torch.Tensor) -> None:
    """``out[tokens] += delta`` (tokens distinct), rounding delta once to out's dtype: one
    ``index_add_`` on the CPU; on CUDA a gather, add and scatter (``index_add_`` there is an
    atomic add that deterministic mode refuses, though each row has one writer here)."""
    if out.device.type == "cuda":
        out[tokens] += as_dtype(delta, out.dtype)
    else:
        out.index_add_(0, tokens, as_dtype(delta, out.dtype))


def multi_lora_add_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
) -> None:
    """``y[t] += scalings[i] (x[t] A_i^T) B_i^T`` in place for 2-D x ``[T, K]`` and y ``[T, N]``
    (the module docstring says how)."""
    if x.shape[0] == 0 or lora_a.shape[0] == 0:
        return
    if not host_groups_allowed(x.device):
        _add_per_token(y, x, lora_a, lora_b, scalings, adapter_ids, ranks)
        return
    groups = adapter_groups(adapter_ids, ranks, lora_a.shape[1])
    if not groups:
        return
    tokens = torch.cat([g.tokens for g in groups]) if len(groups) > 1 else groups[0].tokens
    xs = as_dtype(x[tokens], lora_a.dtype)  # the tokens with an adapter, grouped
    delta = xs.new_empty(xs.shape[0], lora_b.shape[1])
    scale_list = scalings.to(lora_a.dtype).tolist()
    start = 0
    for g in groups:
        rows = slice(start, start + len(g.tokens))
        s = torch.mm(xs[rows], lora_a[g.slot, :g.rank].t()).mul_(scale_list[g.slot])
        torch.mm(s, lora_b[g.slot, :, :g.rank].t(), out=delta[rows])
        start = rows.stop
    _add_rows(y, tokens, delta)


def _add_per_token(y, x, lora_a, lora_b, scalings, adapter_ids, ranks) -> None:
    """The host-sync-free path: each token gathers its own slot (see the module docstring)."""
    num_slots, r_max, _ = lora_a.shape
    ids = adapter_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_slots)
    slot = torch.where(valid, ids, 0)
    # [T, R_MAX]: the ranks each token uses (none for a token without adapter).
    rank_ok = (torch.arange(r_max, device=x.device) < clamped_ranks(ranks, r_max)[slot][:, None]) & valid[:, None]
    scale = scalings[slot].to(lora_a.dtype)[:, None]
    for start in range(0, x.shape[0], _GATHER_CHUNK):
        rows = slice(start, start + _GATHER_CHUNK)
        ok = rank_ok[rows]
        # Masked with where, not multiplied: the padding of a slot is never used, whatever it holds.
        a = lora_a[slot[rows]].masked_fill(~ok[:, :, None], 0)
        b = lora_b[slot[rows]].masked_fill(~ok[:, None, :], 0)
        s = torch.bmm(a, x[rows].to(lora_a.dtype)[:, :, None])[:, :, 0] * scale[rows]
        y[rows] += torch.bmm(b, s[:, :, None])[:, :, 0].to(y.dtype)


def multi_lora_backward_torch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    dx: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The LoRA part of the backward (the launchers' ``multi_lora_backward`` contract): ``dx``
    (holding ``dY W``) gets ``+= dS_i A_i`` in place; returns ``(dA [L, R_MAX, K],
    dB [L, N, R_MAX])`` in the adapters' dtype (None unless asked), zero for absent slots and
    past each rank. One pair of GEMMs per adapter present, over its tokens in token order."""
    lora_dtype = lora_a.dtype
    da = torch.zeros_like(lora_a) if need_a else None
    db = torch.zeros_like(lora_b) if need_b else None
    for g in adapter_groups(adapter_ids, ranks, lora_a.shape[1]):
        a, b = lora_a[g.slot, :g.rank], lora_b[g.slot, :, :g.rank]
        scale = scalings[g.slot].to(lora_dtype)
        gy = grad_y[g.tokens].to(lora_dtype)
        ds = (gy @ b) * scale
        if dx is not None:
            _add_rows(dx, g.tokens, ds @ a)
        if need_a:
            da[g.slot, :g.rank] = ds.t() @ x[g.tokens].to(lora_dtype)
        if need_b:
            db[g.slot, :, :g.rank] = gy.t() @ ((x[g.tokens].to(lora_dtype) @ a.t()) * scale)
    return da, db
