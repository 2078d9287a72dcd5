"""The Trainer copy: ``model.safetensors`` holding an adapter's tensors under the model's own
state-dict keys, which a transformers model's ``save_pretrained`` writes beside the adapter's
files, so that HF ``Trainer`` resumes from (and reloads the best of) the checkpoints of a
fastpeft model with no extra line.

Trainer loads an adapter-only checkpoint (``adapter_model.safetensors``) only into a
``peft.PeftModel`` (an isinstance check). For any other model, ``train(resume_from_checkpoint=)``
and ``load_best_model_at_end`` read ``model.safetensors`` and call
``model.load_state_dict(tensors, strict=False)`` (without FSDP or DeepSpeed, which load
their own files). Given the adapter's tensors under the model's keys, that restores the
adapter exactly and leaves the frozen base as it is; Trainer then logs the base's keys as
missing, which they are by design (``enable_adapter_checkpoints`` loads through fastpeft
instead: the checkpoint's config is checked against the model's, and nothing is logged).

The copy is the adapter's size, and its safetensors metadata marks it (``fastpeft``:
``adapter-only``), so that fastpeft tells it from a full model's file (``is_copy``):

* a save writes it only into a directory without a transformers model's files (weights,
  indexes, ``config.json``; a copy of an earlier save aside), so
  that it never replaces a full model's weights nor makes ``from_pretrained`` of a model
  directory read the adapter as its weights;
* a save that writes the adapter without it removes an earlier copy, in the same commit,
  so a copy is never stale;
* an adapter directory with a copy is still adapter-only to ``is_adapter_checkpoint``.

PEFT's and AdapterHub's loaders read only their own files and ignore it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import safetensors.torch
import torch

from fastpeft.formats.file_names import TRAINER_COPY_NAME
from fastpeft.formats.safe_write import Directory
from fastpeft.formats.snapshot import Snapshot

# The copy's safetensors metadata, its only entry: safetensors writes metadata entries in no
# fixed order, so a second one would make two saves of one adapter differ byte for byte. No
# "format": "pt" either, which transformers' own files carry and transformers 4's
# from_pretrained requires: it refuses the copy as a model's weights.
MARK = ("fastpeft", "adapter-only")
# A transformers model's weight files (transformers' SAFE_WEIGHTS_NAME, WEIGHTS_NAME and their
# sharded indexes) and its config (CONFIG_NAME): a directory with one holds a model.
MODEL_WEIGHT_FILES = (TRAINER_COPY_NAME, "pytorch_model.bin", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json")
MODEL_CONFIG_NAME = "config.json"
# Largest header read to tell a copy from a full model's file. A copy's header lists the
# adapter's tensors (~150 bytes each; LoRA on every linear of a 126-layer Llama has 1764, so
# ~0.3 MB); a longer header is not a copy's.
MAX_HEADER_BYTES = 4 << 20
# safetensors files start with the header's length, a little-endian uint64.
_LENGTH_BYTES = 8


def copy_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The copy of ``tensors`` (the adapter's, keyed as ``model.state_dict()``: CPU,
    contiguous, sharing no storage), marked as one."""
    return safetensors.torch.save(dict(tensors), metadata=dict([MARK]))


def is_copy(snapshot: Snapshot) -> bool:
    """Whether the snapshot's ``model.safetensors`` is a Trainer copy (the file's header carries
    the mark); False without one, and for any other file under that name (a full model's,
    something unreadable or not a regular file). Reads the header only."""
    if not snapshot.exists(TRAINER_COPY_NAME):
        return False
    try:
        length = int.from_bytes(snapshot.read_head(TRAINER_COPY_NAME, _LENGTH_BYTES), "little")
        if length > MAX_HEADER_BYTES:
            return False
        head = snapshot.read_head(TRAINER_COPY_NAME, _LENGTH_BYTES + length)
    except ValueError:  # not a regular file, or unreadable: not a copy fastpeft wrote
        return False
    if len(head) < _LENGTH_BYTES + length:  # shorter than its header: truncated
        return False
    try:
        header = json.loads(head[_LENGTH_BYTES:])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get(MARK[0]) == MARK[1]


def _present(snapshot: Snapshot, names: tuple[str, ...], has_copy: bool) -> list[str]:
    """Those of ``names`` the snapshot holds, a copy aside (``has_copy``: ``is_copy``'s answer)."""
    return [name for name in names if snapshot.exists(name) and not (name == TRAINER_COPY_NAME and has_copy)]


def model_weights(snapshot: Snapshot) -> list[str]:
    """The transformers weight files (``MODEL_WEIGHT_FILES``) in the snapshot, a copy aside."""
    return _present(snapshot, MODEL_WEIGHT_FILES, is_copy(snapshot))


def found_in_directory(directory: Directory) -> tuple[bool, list[str]]:
    """What a save finds in the open ``directory`` (its lock held, no save journal pending):
    whether it holds a copy, and a transformers model's files (``model_weights`` and
    ``config.json``); the copy's header is read once."""
    snapshot = Snapshot(directory.fd, directory.path, None)
    has_copy = is_copy(snapshot)
    return has_copy, _present(snapshot, (*MODEL_WEIGHT_FILES, MODEL_CONFIG_NAME), has_copy)
