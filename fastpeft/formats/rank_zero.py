"""File work done once for a sharded model: rank 0 of the model's process group reads or
writes, every rank learns the outcome, and tensors rank 0 read reach every rank's shards.

Every function here is a collective over ``group`` (``fastpeft.formats.saved_tensors.
sharded_group``): every rank of it calls the same ones, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from fastpeft.methods.sharding import is_sharded

T = TypeVar("T")


def on_rank_zero(group: dist.ProcessGroup, what: str, work: Callable[[], T]) -> T | None:
    """``work()`` on rank 0 of ``group`` (its result there, None elsewhere); its outcome is
    broadcast, so every rank returns once it succeeded, or raises: rank 0 its own exception,
    the others a ``RuntimeError`` naming ``what`` failed and rank 0's error."""
    result, error = None, None
    if dist.get_rank(group) == 0:
        try:
            result = work()
        except Exception as exc:  # every rank raises it below
            error = exc
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0), group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 of the model's process group could not {what}: {outcome[0]}")
    return result


@torch.no_grad()
def copy_from_rank_zero(target: torch.Tensor, value: torch.Tensor | None, group: dist.ProcessGroup) -> None:
    """Copy ``value`` (the whole tensor, on rank 0 of ``group``; None on the others) into
    ``target`` on every rank: a ``DTensor`` target gets its shard of it (``distribute_tensor``
    scatters rank 0's data), a plain one all of it (a broadcast)."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor  # imported already: target is a DTensor

        device = target.to_local().device
        whole = value if value is not None else torch.empty(target.shape, dtype=target.dtype)
        target.copy_(distribute_tensor(whole.to(device=device, dtype=target.dtype), target.device_mesh,
                                       target.placements))
        return
    whole = value.to(target) if value is not None else torch.empty_like(target)
    dist.broadcast(whole, src=dist.get_global_rank(group, 0), group=group)
    target.copy_(whole)


def broadcast_object(group: dist.ProcessGroup, obj: T | None) -> T:
    """Rank 0 of ``group``'s ``obj`` on every rank (pickled by torch.distributed: rank 0 is one
    of the caller's own processes, never outside data)."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
