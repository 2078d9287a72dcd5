"""The torch path of the multi-adapter LoRA op: CPU tensors, float64, and the default on CUDA
until the kernels have run on a GPU (``fastpeft.backend``).

Same contract as the kernels' launchers (``fastpeft.kernels.multi_lora.launch``): the LoRA
term is added into y (which holds the base ``x W^T + b``) in place; ids outside ``[0, L)``
mean no adapter; slot i uses its first ``ranks[i]`` ranks (clamped to ``[0, R_MAX]``). The
rank-r side runs in the adapters' dtype and each token's delta is rounded once to y's dtype
and added, as PEFT's mixed batch does.

The formulation is picked by device and size (``formulation``), or forced with the entry
points' ``how`` argument (the tests run the static ones on CPU tensors):

``"grouped"`` (CPU tensors, where reading a tensor on the host costs no sync): tokens are
grouped by adapter and the group sizes read on the host; the rows of the tokens with an
adapter are gathered once, each adapter runs two GEMMs on its contiguous block of rows at
its own rank (slices of its slot: no copy of any weight, nothing past the rank read), and
the deltas are scattered into y with one ``index_add_``. The backward runs one pair of
GEMMs per adapter present, over its tokens in token order. PEFT's mixed batch instead
masks, gathers and scatters per adapter. (A padded ``bmm`` over gathered slots was tried on
the CPU: copying the slots cost more than the loop.)

Static (every other device, CUDA included): no value is read on the host and every shape
follows from the arguments' shapes alone, so a CUDA step neither syncs nor breaks CUDA-graph
capture. Which slot and ranks a token uses is a mask, ``skip [T, L R_MAX]`` (bool: true
unless the token's id is the slot and the rank is below the slot's); the padding past each
rank is replaced with ``masked_fill``, never multiplied (it is never used, whatever it
holds, NaN included). For T tokens, L slots, x ``[T, K]`` and y ``[T, N]``, the forward is

- ``"slots"`` (``T >= L``): ``S = x A^T`` against every slot at once (``lora_a`` viewed as
  ``[L R_MAX, K]``: a copy only if it is not contiguous), scaled and masked in place, then
  ``y += S B'`` with ``B' [L R_MAX, N]`` every slot's B transposed, zero past its rank.
  Allocates ``S`` (``T x L R_MAX`` in the adapters' dtype), ``skip`` (``T x L R_MAX``
  bool), ``B'`` (a copy of every slot's B) and the delta (``T x N``); computes the rank-r
  products against all L slots (L times their FLOPs) and reads every slot once;
- ``"tokens"`` (``T < L``: a decode step among many loaded adapters): each token gathers
  its slot's ``A`` and ``B``, ``C x R_MAX x (K + N)`` for a chunk of ``C = min(T,
  _GATHER_CHUNK)`` tokens, and runs two batched vector products over ``R_MAX``; reads
  only the slots in use, once per token.

The static backward (``"slots"`` for either), with the same mask: ``dS = (dY B') * scale``
masked (``T x L R_MAX``, when dX or dA is asked), ``dX += dS A'`` (``A'``: a copy of every
slot's A zero past its rank, ``L R_MAX x K``, when dX is asked), ``dA = dS^T x`` (``[L,
R_MAX, K]``) and ``dB = dY^T S`` (S recomputed; the ``[N, L R_MAX]`` product copied into
``[L, N, R_MAX]``). Fixed-order GEMMs, no atomics: deterministic.

Everything is plain torch ops, so autograd can differentiate either backward
(``create_graph=True``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastpeft.ops.op_calls import as_dtype

# Tokens per chunk of the per-token formulation: 256 tokens x rank 64 x K 4096 x 2 bytes
# gathers 128 MB of A rows; smaller chunks cost more launches.
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
    """Whether the tokens may be grouped by reading the ids on the host: on CPU tensors only
    (no sync to pay there). Every other device, CUDA included, takes the static path."""
    return device.type == "cpu"


def formulation(device: torch.device, num_tokens: int, num_slots: int) -> str:
    """The forward's formulation for T tokens and L slots on ``device`` (the module docstring
    says each): ``"grouped"`` where ``host_groups_allowed``, else ``"tokens"`` when
    ``T < L`` and ``"slots"`` otherwise. The backward takes ``"slots"`` for ``"tokens"``."""
    if host_groups_allowed(device):
        return "grouped"
    return "tokens" if num_tokens < num_slots else "slots"


def clamped_ranks(ranks: torch.Tensor, r_max: int) -> torch.Tensor:
    """``ranks`` clamped to ``[0, R_MAX]`` (the kernels' semantics)."""
    return ranks.clamp(0, r_max)


def adapter_groups(adapter_ids: torch.Tensor, ranks: torch.Tensor, r_max: int) -> list[Group]:
    """The adapters present in CPU ``adapter_ids [T]`` (ids outside ``[0, L)`` skipped), in
    slot order, each with its tokens in token order. Reads the ids and ranks on the host."""
    num_slots = ranks.shape[0]
    rank_list = clamped_ranks(ranks, r_max).tolist()
    if adapter_ids.shape[0] <= HOST_GROUPING_MAX_TOKENS:
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


def multi_lora_add_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    how: str | None = None,
) -> None:
    """``y[t] += scalings[i] (x[t] A_i^T) B_i^T`` in place for 2-D x ``[T, K]`` and y ``[T, N]``
    with the formulation ``how`` (None: ``formulation``'s pick; the module docstring says each)."""
    if x.shape[0] == 0 or lora_a.shape[0] == 0:
        return
    how = how or formulation(x.device, x.shape[0], lora_a.shape[0])
    if how != "grouped":
        (_add_per_token if how == "tokens" else _add_all_slots)(y, x, lora_a, lora_b, scalings, adapter_ids, ranks)
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
    y.index_add_(0, tokens, as_dtype(delta, y.dtype))


def _rank_mask(ranks: torch.Tensor, r_max: int) -> torch.Tensor:
    """``keep [L, R_MAX]`` bool: the ranks each slot uses (below its rank clamped to ``[0, R_MAX]``)."""
    return torch.arange(r_max, device=ranks.device) < clamped_ranks(ranks, r_max)[:, None]


def _unused_columns(adapter_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``skip [T, L R_MAX]`` bool: true where token t does not use column ``(l, r)`` of the
    slots, i.e. unless its id is l and ``keep[l, r]`` (an id outside ``[0, L)`` matches no
    slot: no adapter)."""
    num_slots, r_max = keep.shape
    slots = torch.arange(num_slots, device=adapter_ids.device)
    skip = (adapter_ids.to(torch.int64)[:, None] != slots)[:, :, None] | ~keep
    return skip.view(adapter_ids.shape[0], num_slots * r_max)


def _column_scales(scalings: torch.Tensor, r_max: int, dtype: torch.dtype) -> torch.Tensor:
    """``[L R_MAX]``: each slot's scaling repeated over its ranks, in ``dtype``."""
    num_slots = scalings.shape[0]
    return scalings.to(dtype)[:, None].expand(num_slots, r_max).reshape(num_slots * r_max)


def _masked_rows(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[L R_MAX, D]`` from ``weights [L, R_MAX, D]`` (every slot's A, or B transposed): a
    contiguous copy, zero past each slot's rank (``masked_fill``: the padding is replaced,
    whatever it holds)."""
    num_slots, r_max, d = weights.shape
    return weights.masked_fill(~keep[:, :, None], 0).reshape(num_slots * r_max, d)


def _rank_side(x: torch.Tensor, lora_a: torch.Tensor, skip: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``S [T, L R_MAX]``: ``scale * x A^T`` against every slot, zero where ``skip``."""
    num_slots, r_max, k = lora_a.shape
    s = torch.mm(as_dtype(x, lora_a.dtype), lora_a.reshape(num_slots * r_max, k).t())
    return s.mul_(scale).masked_fill_(skip, 0)


def _add_all_slots(y, x, lora_a, lora_b, scalings, adapter_ids, ranks) -> None:
    """The static forward against all slots at once (see the module docstring)."""
    r_max = lora_a.shape[1]
    keep = _rank_mask(ranks, r_max)
    s = _rank_side(x, lora_a, _unused_columns(adapter_ids, keep), _column_scales(scalings, r_max, lora_a.dtype))
    y.add_(as_dtype(torch.mm(s, _masked_rows(lora_b.transpose(1, 2), keep)), y.dtype))


def _add_per_token(y, x, lora_a, lora_b, scalings, adapter_ids, ranks) -> None:
    """The static forward per token: each token gathers its own slot (see the module docstring)."""
    num_slots, r_max, _ = lora_a.shape
    ids = adapter_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_slots)
    slot = torch.where(valid, ids, 0)  # an index in range for every token; masked below
    # [T, R_MAX]: the ranks each token does not use (all of them for a token without adapter).
    skip = ~(_rank_mask(ranks, r_max)[slot] & valid[:, None])
    scale = scalings[slot].to(lora_a.dtype)[:, None]
    for start in range(0, x.shape[0], _GATHER_CHUNK):
        rows = slice(start, start + _GATHER_CHUNK)
        s = torch.bmm(lora_a[slot[rows]], as_dtype(x[rows], lora_a.dtype)[:, :, None])[:, :, 0]
        s = s.mul_(scale[rows]).masked_fill_(skip[rows], 0)
        # Masked, not multiplied: the padding of a slot is never used, whatever it holds.
        b = lora_b[slot[rows]].masked_fill_(skip[rows, None, :], 0)
        y[rows] += as_dtype(torch.bmm(b, s[:, :, None])[:, :, 0], y.dtype)


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
    how: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The LoRA part of the backward (the launchers' ``multi_lora_backward`` contract): ``dx``
    (holding ``dY W``) gets ``+= dS_i A_i`` in place; returns ``(dA [L, R_MAX, K],
    dB [L, N, R_MAX])`` in the adapters' dtype (None unless asked), zero for absent slots and
    past each rank. ``how`` as in ``multi_lora_add_torch``: grouped, one pair of GEMMs per
    adapter present over its tokens in token order, or static over all slots."""
    how = how or formulation(x.device, x.shape[0], lora_a.shape[0])
    if how != "grouped":
        return _backward_all_slots(grad_y, x, dx, lora_a, lora_b, scalings, adapter_ids, ranks, need_a, need_b)
    lora_dtype = lora_a.dtype
    da = torch.zeros_like(lora_a) if need_a else None
    db = torch.zeros_like(lora_b) if need_b else None
    for g in adapter_groups(adapter_ids, ranks, lora_a.shape[1]):
        a, b = lora_a[g.slot, :g.rank], lora_b[g.slot, :, :g.rank]
        scale = scalings[g.slot].to(lora_dtype)
        gy = grad_y[g.tokens].to(lora_dtype)
        ds = (gy @ b) * scale
        if dx is not None:
            dx.index_add_(0, g.tokens, as_dtype(ds @ a, dx.dtype))
        if need_a:
            da[g.slot, :g.rank] = ds.t() @ x[g.tokens].to(lora_dtype)
        if need_b:
            db[g.slot, :, :g.rank] = gy.t() @ ((x[g.tokens].to(lora_dtype) @ a.t()) * scale)
    return da, db


def _backward_all_slots(grad_y, x, dx, lora_a, lora_b, scalings, adapter_ids, ranks, need_a, need_b):
    """The static backward over all slots at once, masked (see the module docstring)."""
    num_slots, r_max, k = lora_a.shape
    n = lora_b.shape[1]
    if x.shape[0] == 0 or num_slots == 0:
        return (torch.zeros_like(lora_a) if need_a else None), (torch.zeros_like(lora_b) if need_b else None)
    keep = _rank_mask(ranks, r_max)
    skip = _unused_columns(adapter_ids, keep)
    scale = _column_scales(scalings, r_max, lora_a.dtype)
    gy = as_dtype(grad_y, lora_a.dtype)
    da = db = None
    if dx is not None or need_a:
        ds = torch.mm(gy, _masked_rows(lora_b.transpose(1, 2), keep).t()).mul_(scale).masked_fill_(skip, 0)
        if dx is not None:
            dx.add_(as_dtype(torch.mm(ds, _masked_rows(lora_a, keep)), dx.dtype))
        if need_a:
            da = torch.mm(ds.t(), as_dtype(x, lora_a.dtype)).view(num_slots, r_max, k)
    if need_b:
        s = _rank_side(x, lora_a, skip, scale)
        db = torch.mm(gy.t(), s).view(n, num_slots, r_max).transpose(0, 1).contiguous()
    return da, db
