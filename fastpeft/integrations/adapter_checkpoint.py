"""Loading an adapter checkpoint back into the adapter a model already has, in place.

A training run that resumes (or reloads its best checkpoint) has its adapter already
installed, and an optimizer may already hold its parameters: ``fastpeft.load_adapter``
(which adds a new adapter to a plain model) does not fit. ``load_adapter_weights`` checks
that the checkpoint describes the same adapter and copies its tensors into the existing
parameters, which keep their identity. Every adapter type is read from its native files,
as ``save_adapter`` writes them:

* LoRA: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``;
* prompt tuning, prefix tuning, P-tuning: PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors`` (``prompt_embeddings`` and ``modules_to_save``). PEFT's file
  holds the *computed* prompts / prefix, not a reparameterization's MLP / LSTM (prefix
  tuning with ``prefix_projection``, P-tuning before ``merge_prefix``), so ``save_adapter``
  also writes ``fastpeft_prompt_encoder.safetensors`` for one, in the same save (its
  encoder's state dict: ``peft_prompt.ENCODER_STATE_NAME``), which resuming needs and PEFT
  ignores;
* bottleneck adapters: AdapterHub's ``adapter_config.json`` + ``adapter.safetensors``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from fastpeft.api.adapters import adapter_state_dict, require_adapter
from fastpeft.formats import adapterhub, peft_prompt, trainer_copy
from fastpeft.formats import peft as peft_format
from fastpeft.formats.file_names import (
    CONFIG_NAME,
    ENCODER_STATE_NAME,
    HUB_WEIGHTS_NAME,
    PEFT_WEIGHTS_NAME,
    SAVED_FILE_NAMES,
)
from fastpeft.formats.peft_prompt import unsaved_encoder
from fastpeft.formats.rank_zero import copy_from_rank_zero, on_rank_zero
from fastpeft.formats.saved_tensors import check_dtype, check_keys, sharded_group
from fastpeft.formats.snapshot import Snapshot, open_snapshot
from fastpeft.methods.bottleneck.config import AdapterConfig
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.prompt.config import prompt_config_from_dict
from fastpeft.methods.prompt.model import ENCODER_NAME
from fastpeft.methods.state import adapter_state

# The adapter weight files save_adapter writes: PEFT's (LoRA, prompt learning), AdapterHub's (bottleneck).
ADAPTER_WEIGHT_FILES = (PEFT_WEIGHTS_NAME, HUB_WEIGHTS_NAME)
# Config fields that do not describe the adapter's layers or math: a resumed run may differ.
UNCOMPARED_FIELDS = frozenset({"base_model_name_or_path"})


def is_adapter_checkpoint(directory: str | bytes | os.PathLike) -> bool:
    """Whether ``directory`` holds an adapter in a format ``save_adapter`` writes (PEFT's or
    AdapterHub's safetensors files) and no full model's weights (the Trainer copy of the
    adapter aside: ``trainer_copy.model_weights``)."""
    try:
        with open_snapshot(directory, SAVED_FILE_NAMES) as snapshot:
            return snapshot.exists(CONFIG_NAME) and any(snapshot.exists(name) for name in ADAPTER_WEIGHT_FILES) \
                and not trainer_copy.model_weights(snapshot)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _comparable(value: object) -> object:
    """A field value with the order of its list dropped: every list field of the configs
    (module names, layer indices) is a set to PEFT, which saves some of them unordered."""
    return sorted(value, key=repr) if isinstance(value, (tuple, list)) else value


def _fields(config: Any) -> dict[str, object]:
    return {f.name: _comparable(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.compare and f.name not in UNCOMPARED_FIELDS}


class AdapterFiles(NamedTuple):
    """How one adapter type is saved: ``kind`` (its name in messages), its weight file, how
    to read a config JSON into comparable fields, the model's own live tensors under the
    file's keys (what a checkpoint is copied into), and the config JSON ``save_adapter``
    writes for the model (what the checkpoint's must describe alike)."""

    kind: str
    weights_name: str
    describe: Callable[[Any], dict[str, object]]  # config JSON -> comparable fields
    targets: dict[str, torch.Tensor]
    config_json: dict[str, Any]


def _lora_files(model: nn.Module, saved: dict[str, torch.Tensor]) -> AdapterFiles:
    live = model.state_dict(keep_vars=True)
    targets = {key: live[key.removeprefix(peft_format.KEY_PREFIX)] for key in saved}
    return AdapterFiles("LORA", PEFT_WEIGHTS_NAME, lambda data: _fields(LoraConfig.from_dict(data)), targets,
                        peft_format.saved_lora_config(model))


def _prompt_files(model: nn.Module, saved: dict[str, torch.Tensor]) -> AdapterFiles:
    live = model.state_dict(keep_vars=True)
    targets = {}
    for key in saved:
        if key == peft_prompt.EMBEDDINGS_KEY:
            if unsaved_encoder(model) is None:  # the stored prompts / prefix are the encoder's weight
                targets[key] = live[f"{ENCODER_NAME}.embedding.weight"]
        else:
            targets[key] = live[key.removeprefix(peft_prompt.MODULE_PREFIX)]
    kind = adapter_state(model).config.peft_type

    def describe(data: object) -> dict[str, object]:
        return {"peft_type": data.get("peft_type"), **_fields(prompt_config_from_dict(data))}

    return AdapterFiles(kind, PEFT_WEIGHTS_NAME, describe, targets, peft_prompt.saved_prompt_config(model))


def _bottleneck_files(model: nn.Module, saved: dict[str, torch.Tensor]) -> AdapterFiles:
    def describe(data: object) -> dict[str, object]:
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError("not an AdapterHub adapter config (a JSON object with 'config')")
        return {**_fields(AdapterConfig.from_dict(data["config"])),
                **{key: data.get(key) for key in ("name", "model_type", "hidden_size")}}

    return AdapterFiles("bottleneck (AdapterHub)", HUB_WEIGHTS_NAME, describe,
                        adapterhub.adapterhub_parameters(model), adapterhub.adapterhub_config(model))


# How each method of ``fastpeft.api.adapters.METHODS`` (by name) is checkpointed, given the model
# and its ``adapter_state_dict`` (the keys a save writes).
_CHECKPOINT_FILES: dict[str, Callable[[nn.Module, dict[str, torch.Tensor]], AdapterFiles]] = {
    "LoRA": _lora_files, "bottleneck": _bottleneck_files, "prompt learning": _prompt_files,
}


def model_adapter_files(model: nn.Module, saved: dict[str, torch.Tensor]) -> AdapterFiles:
    """The ``AdapterFiles`` of the model's adapter, whose ``adapter_state_dict`` is ``saved``."""
    return _CHECKPOINT_FILES[require_adapter(model).name](model, saved)


def _file_kind(snapshot: Snapshot) -> str:
    """The adapter type a checkpoint directory holds, in ``AdapterFiles.kind``'s words."""
    if adapterhub.is_adapterhub_directory(snapshot):
        return "bottleneck (AdapterHub)"
    data = peft_prompt.read_config_data(snapshot)
    return data["peft_type"] if data is not None else "LORA"


def _read_checked(snapshot: Snapshot, name: str, expected: dict[str, torch.Tensor], what: str) -> dict:
    """The tensors of the snapshot's ``name``, which must be exactly ``expected``'s keys, with
    their shapes and dtypes (``check_dtype``)."""
    path = snapshot.file_path(name)
    if not snapshot.exists(name):
        raise FileNotFoundError(f"no {name} in {snapshot.path!r}{what}")
    tensors = snapshot.read_safetensors(name)
    check_keys(expected, tensors, f"{path!r} does not hold the model's adapter tensors")
    for key, like in expected.items():
        if tensors[key].shape != like.shape:
            raise ValueError(f"{path!r}: {key!r} has shape {tuple(tensors[key].shape)}, the model's has "
                             f"{tuple(like.shape)}")
        check_dtype(tensors[key], like.dtype, key, repr(path))
    return tensors


def load_adapter_weights(model: nn.Module, directory: str | bytes | os.PathLike) -> None:
    """Copy the adapter saved in ``directory`` (by ``save_adapter`` or a fastpeft model's
    ``save_pretrained``) into ``model``'s adapter, in place, for every adapter type (LoRA,
    bottleneck, prompt / prefix / P-tuning; see the module docstring for the files).

    The checkpoint must describe the model's adapter: the same type, the same config
    (``base_model_name_or_path`` and AdapterHub's ``model_name`` / ``model_class`` /
    ``version`` are not compared; list fields are compared as sets, as PEFT saves them) and
    exactly the model's adapter tensors, with their shapes and dtype kinds (floating point
    where the model's are: an integer or bool tensor is refused, not cast). A
    reparameterized prompt encoder (prefix MLP, P-tuning MLP / LSTM) is restored from
    ``ENCODER_STATE_NAME``, which must be there. All files come from one save (read as
    ``fastpeft.load_adapter`` reads them: ``fastpeft.formats.snapshot``), and everything is
    checked before anything is copied.

    A model sharded with FSDP2 (``DTensor`` parameters): call it on every rank, as a
    collective. Rank 0 of the model's process group reads and checks the files; every rank
    copies its shard of each tensor (scattered from rank 0), or raises rank 0's error with
    nothing copied.

    Raises:
        ValueError: the model has no fastpeft adapter, or the checkpoint holds another
            adapter type, or its config, keys, shapes or dtypes differ from the model's,
            or a file is unreadable, not a regular file or too large.
        FileNotFoundError: ``directory`` does not exist or lacks the config or a weight file.
        TypeError: ``directory`` is not a str, bytes or ``os.PathLike`` path.
    """
    saved = adapter_state_dict(model)  # of a sharded model: gathered on every rank (a collective), once
    files = model_adapter_files(model, saved)
    targets = _checkpoint_targets(model, files)
    group = sharded_group(model)

    def read() -> dict[str, torch.Tensor]:
        with open_snapshot(directory, SAVED_FILE_NAMES) as snapshot:
            return _read_checkpoint(model, files, snapshot, saved)

    if group is None:
        values = read()
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(values[key])
        return
    values = on_rank_zero(group, "read the adapter checkpoint", read)
    for key, target in targets.items():
        copy_from_rank_zero(target, None if values is None else values[key], group)


def _checkpoint_targets(model: nn.Module, files: AdapterFiles) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint is copied into, by the key ``_read_checkpoint`` gives
    its value: the adapter file's keys, and a reparameterized prompt encoder's state."""
    targets = dict(files.targets)
    encoder = unsaved_encoder(model)
    if encoder is not None:
        targets.update({f"{ENCODER_NAME}.{k}": v for k, v in encoder.state_dict(keep_vars=True).items()})
    return targets


def _read_checkpoint(model: nn.Module, files: AdapterFiles, snapshot: Snapshot,
                     saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``load_adapter_weights``' checks and reads, against the model's adapter as a save
    would write it (``saved``): the checkpoint's value for each ``_checkpoint_targets`` key."""
    config_path = snapshot.file_path(CONFIG_NAME)
    if not snapshot.exists(CONFIG_NAME):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {snapshot.path!r}")
    kind = _file_kind(snapshot)
    if kind != files.kind:
        raise ValueError(f"{snapshot.path!r} holds a {kind} adapter, the model has a {files.kind} adapter")
    try:
        saved_config = files.describe(snapshot.read_json(CONFIG_NAME))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{config_path!r} is not a readable {files.kind} adapter config: {exc}") from exc
    current = files.describe(files.config_json)
    differences = [f"{key}: saved {saved_config.get(key)!r}, model {value!r}"
                   for key, value in current.items() if saved_config.get(key) != value]
    if differences:
        raise ValueError(f"{snapshot.path!r} holds another adapter than the model's: {'; '.join(differences)}")
    tensors = _read_checked(snapshot, files.weights_name, saved, "")
    values = {key: tensors[key] for key in files.targets}
    encoder = unsaved_encoder(model)
    if encoder is not None:
        state = encoder.state_dict(keep_vars=True)
        encoder_tensors = _read_checked(
            snapshot, ENCODER_STATE_NAME, {k: v.detach() for k, v in state.items()},
            f": PEFT's {PEFT_WEIGHTS_NAME} holds the computed {files.kind} prompts, not the reparameterization "
            "this model trains; fastpeft writes its weights to that file beside it (save_adapter)",
        )
        values.update({f"{ENCODER_NAME}.{k}": encoder_tensors[k] for k in state})
    return values
