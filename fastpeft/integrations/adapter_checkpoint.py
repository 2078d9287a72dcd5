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
  tuning with ``prefix_projection``, P-tuning before ``merge_prefix``), so a fastpeft model
  with one also writes ``fastpeft_prompt_encoder.safetensors`` beside them (its encoder's
  state dict: ``ENCODER_STATE_NAME``), which resuming needs and PEFT ignores;
* bottleneck adapters: AdapterHub's ``adapter_config.json`` + ``adapter.safetensors``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
import torch.nn as nn

from fastpeft.layers.prefix_encoder import PrefixEncoder
from fastpeft.layers.prompt_embedding import PTuningEncoder
from fastpeft.model import adapterhub_io, prompt_io, safe_write
from fastpeft.model.adapter_io import (
    CONFIG_NAME,
    KEY_PREFIX,
    SAFETENSORS_NAME,
    _saved_config,
    adapter_state_dict,
    read_json,
)
from fastpeft.model.bottleneck_config import AdapterConfig
from fastpeft.model.config import LoraConfig
from fastpeft.model.injection import adapter_state, require_module
from fastpeft.model.prompt_config import prompt_config_from_dict
from fastpeft.model.prompt_injection import ENCODER_NAME, prompt_encoder
from fastpeft.model.saved_tensors import cpu_copies

# Weight files of a full transformers checkpoint (transformers' WEIGHTS_NAME, SAFE_WEIGHTS_NAME
# and their sharded indexes): a directory with one of them is not an adapter-only checkpoint.
FULL_MODEL_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
# The adapter weight files save_adapter writes: PEFT's (LoRA, prompt learning), AdapterHub's (bottleneck).
ADAPTER_WEIGHT_FILES = (SAFETENSORS_NAME, adapterhub_io.SAFETENSORS_NAME)
# The state dict of a prompt encoder whose trainable weights PEFT's file lacks (see the module docstring).
ENCODER_STATE_NAME = "fastpeft_prompt_encoder.safetensors"
# Config fields that do not describe the adapter's layers or math: a resumed run may differ.
UNCOMPARED_FIELDS = frozenset({"base_model_name_or_path"})


def is_adapter_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an adapter in a format ``save_adapter`` writes (PEFT's or
    AdapterHub's safetensors files) and no full model."""
    path = Path(directory)
    return (path / CONFIG_NAME).is_file() and any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES) and not any(
        (path / name).exists() for name in FULL_MODEL_FILES
    )


def unsaved_encoder(model: nn.Module) -> nn.Module | None:
    """The model's prompt encoder when PEFT's file cannot restore it (an unmerged prefix MLP
    or P-tuning MLP / LSTM: the file holds their output), else None."""
    if not prompt_io.has_prompt_adapter(model):
        return None
    encoder = prompt_encoder(model)
    if isinstance(encoder, PTuningEncoder) and not encoder.merged:
        return encoder
    return encoder if isinstance(encoder, PrefixEncoder) and encoder.prefix_projection else None


def encoder_state_bytes(model: nn.Module) -> bytes | None:
    """``ENCODER_STATE_NAME``'s contents for ``model`` (its ``unsaved_encoder``'s state dict,
    CPU copies), or None when PEFT's file is enough."""
    encoder = unsaved_encoder(model)
    if encoder is None:
        return None
    state = cpu_copies(encoder.state_dict())
    return safetensors.torch.save(state, metadata={"format": "pt"})


def save_encoder_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``ENCODER_STATE_NAME`` into the adapter directory ``directory`` when the model's
    prompt encoder needs it (``unsaved_encoder``), as ``save_adapter`` writes its files
    (temp file, fsync, rename, directory fsync); remove a stale one (an adapter merged since)
    otherwise."""
    data = encoder_state_bytes(model)
    if data is None and not (Path(directory) / ENCODER_STATE_NAME).exists():
        return
    with safe_write.open_directory(directory) as target:
        if data is None:
            safe_write.remove(target, ENCODER_STATE_NAME)
        else:
            temp = safe_write.stage(target, ENCODER_STATE_NAME, data)
            try:
                safe_write.commit(target, temp, ENCODER_STATE_NAME)
            except BaseException:
                safe_write.remove(target, temp)
                raise
        safe_write.sync(target)


def _comparable(value: object) -> object:
    """A field value with the order of its list dropped: every list field of the configs
    (module names, layer indices) is a set to PEFT, which saves some of them unordered."""
    return sorted(value, key=repr) if isinstance(value, (tuple, list)) else value


def _fields(config: Any) -> dict[str, object]:
    return {f.name: _comparable(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.compare and f.name not in UNCOMPARED_FIELDS}


class AdapterFiles(NamedTuple):
    """How one adapter type is saved: ``kind`` (its name in messages), its weight file, how
    to read a config JSON into comparable fields, and the model's own live tensors under
    the file's keys (what a checkpoint is copied into)."""

    kind: str
    weights_name: str
    describe: Callable[[Any], dict[str, object]]  # config JSON -> comparable fields
    targets: dict[str, torch.Tensor]


def _lora_files(model: nn.Module) -> AdapterFiles:
    live = model.state_dict(keep_vars=True)
    targets = {key: live[key.removeprefix(KEY_PREFIX)] for key in adapter_state_dict(model)}
    return AdapterFiles("LORA", SAFETENSORS_NAME, lambda data: _fields(LoraConfig.from_dict(data)), targets)


def _prompt_files(model: nn.Module) -> AdapterFiles:
    live = model.state_dict(keep_vars=True)
    targets = {}
    for key in adapter_state_dict(model):
        if key == prompt_io.EMBEDDINGS_KEY:
            if unsaved_encoder(model) is None:  # the stored prompts / prefix are the encoder's weight
                targets[key] = live[f"{ENCODER_NAME}.embedding.weight"]
        else:
            targets[key] = live[key.removeprefix(prompt_io.MODULE_PREFIX)]
    kind = adapter_state(model).config.peft_type

    def describe(data: object) -> dict[str, object]:
        return {"peft_type": data.get("peft_type"), **_fields(prompt_config_from_dict(data))}

    return AdapterFiles(kind, SAFETENSORS_NAME, describe, targets)


def _bottleneck_files(model: nn.Module) -> AdapterFiles:
    def describe(data: object) -> dict[str, object]:
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError("not an AdapterHub adapter config (a JSON object with 'config')")
        return {**_fields(AdapterConfig.from_dict(data["config"])),
                **{key: data.get(key) for key in ("name", "model_type", "hidden_size")}}

    return AdapterFiles("bottleneck (AdapterHub)", adapterhub_io.SAFETENSORS_NAME, describe,
                        adapterhub_io.adapterhub_parameters(model))


def model_adapter_files(model: nn.Module) -> AdapterFiles:
    """The ``AdapterFiles`` of the model's adapter; ValueError when it has none."""
    state = adapter_state(require_module(model))
    if state is None:
        raise ValueError("model has no fastpeft adapter: add one with fastpeft.inject, load_adapter or from_peft")
    if prompt_io.has_prompt_adapter(model):
        return _prompt_files(model)
    if state.bottleneck is not None:
        return _bottleneck_files(model)
    return _lora_files(model)


def _model_config_json(model: nn.Module, files: AdapterFiles) -> object:
    """The config JSON ``save_adapter`` writes for the model (parsed back like the file's)."""
    if files.weights_name == adapterhub_io.SAFETENSORS_NAME:
        return adapterhub_io.adapterhub_config(model)
    return _saved_config(model)


def _file_kind(directory: Path) -> str:
    """The adapter type a checkpoint directory holds, in ``AdapterFiles.kind``'s words."""
    if adapterhub_io.is_adapterhub_directory(directory):
        return "bottleneck (AdapterHub)"
    data = prompt_io.read_config_data(directory)
    return data["peft_type"] if data is not None else "LORA"


def _read_checked(directory: Path, name: str, expected: dict[str, tuple[int, ...]], what: str) -> dict:
    """The tensors of ``directory/name``, which must be exactly ``expected``'s keys and shapes."""
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in {str(directory)!r}{what}")
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{str(path)!r} does not hold the model's adapter tensors: missing {missing[:8]}, "
                         f"unexpected {extra[:8]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{str(path)!r}: {key!r} has shape {tuple(tensors[key].shape)}, the model's has {shape}")
    return tensors


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the adapter saved in ``directory`` (by ``save_adapter`` or a fastpeft model's
    ``save_pretrained``) into ``model``'s adapter, in place, for every adapter type (LoRA,
    bottleneck, prompt / prefix / P-tuning; see the module docstring for the files).

    The checkpoint must describe the model's adapter: the same type, the same config
    (``base_model_name_or_path`` and AdapterHub's ``model_name`` / ``model_class`` /
    ``version`` are not compared; list fields are compared as sets, as PEFT saves them) and
    exactly the model's adapter tensors, with their shapes. A reparameterized prompt encoder
    (prefix MLP, P-tuning MLP / LSTM) is restored from ``ENCODER_STATE_NAME``, which must be
    there. Everything is checked before anything is copied.

    Raises:
        ValueError: the model has no fastpeft adapter, or the checkpoint holds another
            adapter type, or its config, keys or shapes differ from the model's.
        FileNotFoundError: ``directory`` lacks the config or a weight file.
    """
    files = model_adapter_files(model)
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}")
    kind = _file_kind(directory)
    if kind != files.kind:
        raise ValueError(f"{str(directory)!r} holds a {kind} adapter, the model has a {files.kind} adapter")
    try:
        saved = files.describe(read_json(directory / CONFIG_NAME))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{str(directory / CONFIG_NAME)!r} is not a readable {files.kind} adapter config: {exc}") \
            from exc
    current = files.describe(_model_config_json(model, files))
    differences = [f"{key}: saved {saved.get(key)!r}, model {value!r}"
                   for key, value in current.items() if saved.get(key) != value]
    if differences:
        raise ValueError(f"{str(directory)!r} holds another adapter than the model's: {'; '.join(differences)}")
    expected = {key: tuple(value.shape) for key, value in adapter_state_dict(model).items()}
    tensors = _read_checked(directory, files.weights_name, expected, "")
    targets = {key: (files.targets[key], tensors[key]) for key in files.targets}
    encoder = unsaved_encoder(model)
    if encoder is not None:
        state = encoder.state_dict(keep_vars=True)
        encoder_tensors = _read_checked(
            directory, ENCODER_STATE_NAME, {k: tuple(v.shape) for k, v in state.items()},
            f": PEFT's {SAFETENSORS_NAME} holds the computed {files.kind} prompts, not the reparameterization "
            "this model trains; fastpeft writes its weights to that file in checkpoints (save_pretrained)",
        )
        targets.update({f"{ENCODER_NAME}.{k}": (v, encoder_tensors[k]) for k, v in state.items()})
    with torch.no_grad():
        for target, value in targets.values():
            target.copy_(value)
