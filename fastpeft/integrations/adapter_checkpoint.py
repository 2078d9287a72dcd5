"""Loading an adapter checkpoint back into the adapter a model already has, in place.

A training run that resumes (or reloads its best checkpoint) has its adapter already
installed, and an optimizer may already hold its parameters: ``fastpeft.load_adapter``
(which adds a new adapter to a plain model) does not fit. ``load_adapter_weights`` checks
that the checkpoint describes the same adapter and copies its tensors into the existing
parameters, which keep their identity.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import safetensors.torch
import torch.nn as nn

from fastpeft.model.adapter_io import (
    CONFIG_NAME,
    KEY_PREFIX,
    SAFETENSORS_NAME,
    _saved_config,
    adapter_state_dict,
)
from fastpeft.model.config import LoraConfig

# Weight files of a full transformers checkpoint (transformers' WEIGHTS_NAME, SAFE_WEIGHTS_NAME
# and their sharded indexes): a directory with one of them is not an adapter-only checkpoint.
FULL_MODEL_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
# Config fields that do not describe the adapter's layers or math: a resumed run may differ.
UNCOMPARED_FIELDS = frozenset({"base_model_name_or_path"})


def is_adapter_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an adapter in PEFT's safetensors format and no full model."""
    path = Path(directory)
    return (path / CONFIG_NAME).is_file() and (path / SAFETENSORS_NAME).is_file() and not any(
        (path / name).exists() for name in FULL_MODEL_FILES
    )


def _comparable(value: object) -> object:
    """A field value with the order of its list dropped: every list field of ``LoraConfig``
    (module names, layer indices) is a set to PEFT, which saves some of them unordered."""
    return sorted(value, key=repr) if isinstance(value, tuple) else value


def _config_differences(saved: LoraConfig, current: LoraConfig) -> list[str]:
    return [
        f"{f.name}: saved {getattr(saved, f.name)!r}, model {getattr(current, f.name)!r}"
        for f in dataclasses.fields(LoraConfig)
        if f.name not in UNCOMPARED_FIELDS
        and _comparable(getattr(saved, f.name)) != _comparable(getattr(current, f.name))
    ]


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the adapter saved in ``directory`` (by ``save_adapter`` or a fastpeft model's
    ``save_pretrained``) into ``model``'s adapter, in place.

    The checkpoint must describe the model's adapter: the same ``LoraConfig`` (all-linear
    resolved as saved; ``base_model_name_or_path`` is not compared) and exactly the model's
    adapter tensors, with their shapes. Everything is checked before anything is copied.

    Raises:
        ValueError: the model has no fastpeft adapter, or the checkpoint's config, keys or
            shapes differ from it.
        FileNotFoundError: ``directory`` lacks the config or the safetensors file.
    """
    expected = adapter_state_dict(model)
    directory = Path(directory)
    for name in (CONFIG_NAME, SAFETENSORS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no {name} in {str(directory)!r}")
    saved_config = LoraConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    differences = _config_differences(saved_config, LoraConfig.from_dict(_saved_config(model)))
    if differences:
        raise ValueError(f"{str(directory)!r} holds another adapter than the model's: {'; '.join(differences)}")
    tensors = safetensors.torch.load_file(directory / SAFETENSORS_NAME, device="cpu")
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{str(directory)!r} does not hold the model's adapter tensors: missing {missing[:8]}, "
                         f"unexpected {extra[:8]}")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise ValueError(f"{str(directory)!r}: {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"the model's has {tuple(value.shape)}")
    # The keys, less the prefix, are the model's own (adapter_state_dict's): every one is loaded.
    model.load_state_dict({k.removeprefix(KEY_PREFIX): v for k, v in tensors.items()}, strict=False)
