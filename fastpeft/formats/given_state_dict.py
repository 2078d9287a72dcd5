"""An adapter save from a state dict the caller already gathered, instead of from the model's own
parameters, which may be shards: HF Trainer passes ``save_pretrained(state_dict=...)`` under
FSDP (accelerate's full state dict) and DeepSpeed ZeRO-3 (the 16-bit state dict gathered on
rank 0), as do loops built on ``torch.distributed.checkpoint.state_dict.get_model_state_dict``
with ``full_state_dict=True``.

``adapter_entries`` picks the adapter's entries out of the state dict (by the model's own
state-dict keys of the tensors a save reads) and checks them: an empty or partial state dict,
a shard, a wrong shape or dtype is an error naming what is wrong, never a weightless save.
``substituted`` puts the entries in place of the model's tensors for a block, so every
format's save code reads them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from fastpeft.formats.saved_tensors import check_dtype, shown_keys
from fastpeft.methods.sharding import is_sharded

# What to do instead, in the errors about a state dict that does not hold the adapter.
_REMEDY = ("pass the full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
           "StateDictOptions(full_state_dict=True); under DeepSpeed ZeRO-3, stage3_gather_16bit_weights_on_model_save "
           "true), or, for a model sharded with FSDP2, call fastpeft.save_adapter(model, directory) on every rank")


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape: a DTensor's global shape, a DeepSpeed ZeRO-3 parameter's
    ``ds_shape`` (its local data is a partition, or empty), else its own."""
    return tuple(getattr(t, "ds_shape", t.shape))


def state_keys(model: nn.Module, sources: Sequence[torch.Tensor]) -> list[str]:
    """The ``model.state_dict()`` keys of the model's tensors ``sources``."""
    names = {id(t): key for key, t in model.state_dict(keep_vars=True).items()}
    return [names[id(t)] for t in sources]


def adapter_entries(model: nn.Module, sources: Sequence[torch.Tensor], state_dict: object) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` (keyed as ``model.state_dict()``) for the model's tensors
    ``sources`` (those a save of its adapter reads), checked.

    Raises:
        TypeError: ``state_dict`` is not a mapping, or an entry is not a tensor.
        ValueError: ``state_dict`` is empty or lacks some of the adapter's keys (named), or an
            entry is a ``DTensor`` shard, or has another shape than the model's whole tensor,
            or an integer dtype where the model's is floating point.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of state-dict keys to tensors, got {type(state_dict).__name__}")
    keys = state_keys(model, sources)
    if not state_dict:
        raise ValueError(f"state_dict is empty: it holds none of the adapter's {len(keys)} tensors, and a save from it "
                         f"would write no weights (DeepSpeed ZeRO-3 hands Trainer an empty one when "
                         f"stage3_gather_16bit_weights_on_model_save is false); {_REMEDY}")
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"state_dict holds {len(keys) - len(missing)} of the adapter's {len(keys)} tensors, missing "
                         f"{shown_keys(missing)} (a partial state dict: one rank's, or a filtered one); {_REMEDY}")
    entries = {}
    for key, own in zip(keys, sources):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
        if is_sharded(value):
            raise ValueError(f"state_dict[{key!r}] is a DTensor (one rank's shard of a sharded state dict); {_REMEDY}")
        if tuple(value.shape) != full_shape(own):
            raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, the model's tensor is "
                             f"{full_shape(own)} (a shard rather than the gathered tensor?); {_REMEDY}")
        check_dtype(value, own.dtype, key, "state_dict")
        entries[key] = value
    return entries


@contextmanager
def substituted(model: nn.Module, entries: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The block with each of the model's parameters or buffers at a key of ``entries``
    replaced by the entry (in its module's ``_parameters`` / ``_buffers``, no hook runs; as a
    ``Parameter`` in place of one, sharing the entry's storage), and
    put back after it, whatever happens. Nothing else may use the model meanwhile (a save
    from a training loop, between steps)."""
    replaced = []
    try:
        for key, value in entries.items():
            path, _, name = key.rpartition(".")
            module = model.get_submodule(path)
            table = module._parameters if name in module._parameters else module._buffers
            original = table[name]
            replaced.append((table, name, original))
            # a parameter stays one (code tells a learned scaling from a constant by its type)
            table[name] = (nn.Parameter(value.detach(), requires_grad=original.requires_grad)
                           if isinstance(original, nn.Parameter) else value)
        yield
    finally:
        for table, name, original in reversed(replaced):
            table[name] = original
