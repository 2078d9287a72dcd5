"""HF PEFT's on-disk format of a LoRA adapter: what ``save_adapter`` writes for one and how
``load_adapter`` reads it (``fastpeft.api`` dispatches to it).

A PEFT LoRA directory holds ``adapter_config.json`` (the ``LoraConfig`` fields plus
``peft_type: "LORA"``) and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), whose
keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` for each LoRA
layer (plus ``.lora_magnitude_vector`` for a DoRA layer) and ``base_model.model.<module path>.<name>`` for each entry of a ``modules_to_save``
module's state dict: what PEFT's ``save_pretrained`` writes for a ``get_peft_model`` model,
whether a plain ``nn.Module`` or a transformers model with a ``task_type``.
"""

from __future__ import annotations

import json
import os
import re

import safetensors.torch
import torch
import torch.nn as nn

from fastpeft.formats.file_names import CONFIG_NAME, PEFT_PICKLE_NAME, PEFT_WEIGHTS_NAME, SAVED_FILE_NAMES
from fastpeft.formats.saved_tensors import check_tensors, cpu_copy, module_tensors
from fastpeft.formats.snapshot import Snapshot, open_snapshot
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.layer import A_MODULE, B_MODULE, MAGNITUDE_KEY, adapter_shapes, lora_keys
from fastpeft.methods.lora.model import build_replacements, install, lora_layers
from fastpeft.methods.lora.targets import InjectionPlan, plan_injection
from fastpeft.methods.state import adapter_state, check_not_adapted, restore_requires_grad

KEY_PREFIX = "base_model.model."
# A LoRA weight key without the prefix, with or without the adapter name PEFT uses in memory.
_LORA_KEY = re.compile(rf"(?P<module>.+)\.(?P<kind>{A_MODULE}|{B_MODULE})(?:\.(?P<adapter>[^.]+))?\.weight")
# A DoRA magnitude key as PEFT holds it in memory (saved, it has no adapter name and no ".weight").
_MAGNITUDE_KEY = re.compile(rf"(?P<module>.+)\.{MAGNITUDE_KEY}\.(?P<adapter>[^.]+)\.weight")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter's tensors under PEFT's saved keys (CPU copies), as a save writes them."""
    out = {}
    for name, layer in lora_layers(model):
        for key, tensor in layer.adapter_tensors().items():
            out[f"{KEY_PREFIX}{name}.{key}"] = cpu_copy(tensor)
    for path in adapter_state(model).modules_to_save:
        for key, value in model.get_submodule(path).state_dict().items():
            out[f"{KEY_PREFIX}{path}.{key}"] = cpu_copy(value)
    return out


def lora_source_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's own tensors that ``lora_state_dict`` copies (A and B of every LoRA layer, a
    DoRA layer's magnitude, the ``modules_to_save`` copies' tensors)."""
    weights = [w for _, layer in lora_layers(model) for w in layer.adapter_tensors().values()]
    return weights + module_tensors(model, adapter_state(model).modules_to_save)


def saved_lora_config(model: nn.Module) -> dict:
    """The LoRA adapter's ``adapter_config.json`` contents, as PEFT writes them: ``"all-linear"``
    resolved to the adapted module paths, ``fan_in_fan_out`` as PEFT leaves it after
    wrapping ``Conv1D`` layers, ``inference_mode`` True, ``base_model_name_or_path`` from the
    transformers model when the config has none."""
    config = adapter_state(model).config
    layers = lora_layers(model)
    data = config.to_dict()
    if config.is_all_linear:
        data["target_modules"] = sorted(name for name, _ in layers)
    data["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    data["inference_mode"] = True
    if data["base_model_name_or_path"] is None:
        name = getattr(getattr(model, "config", None), "name_or_path", None)
        data["base_model_name_or_path"] = name or None
    return data


def saved_files(model: nn.Module) -> dict[str, bytes]:
    """The files a save of the model's LoRA adapter writes, name -> contents, the config last."""
    weights = safetensors.torch.save(lora_state_dict(model), metadata={"format": "pt"})
    return {PEFT_WEIGHTS_NAME: weights,
            CONFIG_NAME: json.dumps(saved_lora_config(model), indent=2, sort_keys=True).encode()}


def read_weights(snapshot: Snapshot, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A PEFT directory's weight file (LoRA or prompt learning): safetensors, else the pickle
    with ``allow_pickle`` (``Snapshot.read_weights``)."""
    return snapshot.read_weights(PEFT_WEIGHTS_NAME, PEFT_PICKLE_NAME, allow_pickle)


def _read_lora(snapshot: Snapshot, allow_pickle: bool) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The snapshot's ``(config, tensors)``, keys made relative to the model (``_normalize_keys``)."""
    config = LoraConfig.from_dict(snapshot.read_json(CONFIG_NAME))
    return config, _normalize_keys(read_weights(snapshot, allow_pickle), snapshot.path)


def read_lora_adapter(directory: str | bytes | os.PathLike,
                      allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA directory's ``(config, tensors)``: the tensors on the CPU under keys relative
    to the model (``_normalize_keys``), both from one save (read from one snapshot). What
    ``MultiAdapterModel`` loads.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: as ``load_adapter``.
    """
    with open_snapshot(directory, SAVED_FILE_NAMES) as snapshot:
        return _read_lora(snapshot, allow_pickle)


def _normalize_keys(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys relative to the model: without the ``base_model.model.`` prefix and without an
    adapter name in LoRA keys (``x.lora_A.default.weight`` -> ``x.lora_A.weight``,
    ``x.lora_magnitude_vector.default.weight`` -> ``x.lora_magnitude_vector``)."""
    out: dict[str, torch.Tensor] = {}
    adapters = set()
    for key, value in tensors.items():
        name = key.removeprefix(KEY_PREFIX)
        match = _LORA_KEY.fullmatch(name)
        magnitude = _MAGNITUDE_KEY.fullmatch(name)
        if match and match["adapter"]:
            adapters.add(match["adapter"])
            a_key, b_key = lora_keys(match["module"])
            name = b_key if match["kind"] == B_MODULE else a_key
        elif magnitude:
            adapters.add(magnitude["adapter"])
            name = f"{magnitude['module']}.{MAGNITUDE_KEY}"
        if name in out:
            raise ValueError(f"{source}: key {key!r} duplicates another key once prefixes and adapter names are removed")
        out[name] = value
    if len(adapters) > 1:
        raise ValueError(f"{source} holds several adapters {sorted(adapters)}; load one adapter at a time")
    return out


def _check_tensors(
    model: nn.Module, plan: InjectionPlan, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """The file must hold exactly the plan's tensors, with the plan's shapes: LoRA weights (and
    DoRA magnitudes) floating point, ``modules_to_save`` entries of their module's dtype kind."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for t in plan.targets:
        in_f, out_f = t.kind.features(t.module)
        for key, shape in adapter_shapes(in_f, out_f, t.r, config.use_dora).items():
            expected[f"{t.name}.{key}"] = (shape, None)
    for path in plan.modules_to_save:
        for key, value in model.get_submodule(path).state_dict().items():
            expected[f"{path}.{key}"] = (tuple(value.shape), value.dtype)
    check_tensors(expected, tensors, source, "the adapter its config describes on this model",
                  "the config's r / rank_pattern and the model's layer")


@torch.no_grad()
def _fill(replacements: dict[str, nn.Module], plan: InjectionPlan, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checked tensors into the not yet installed modules."""
    for t in plan.targets:
        for key, param in replacements[t.name].adapter_tensors().items():
            param.copy_(tensors[f"{t.name}.{key}"])
    for path in plan.modules_to_save:
        prefix = f"{path}."
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        replacements[path].load_state_dict(own, strict=True)


def load_lora(model: nn.Module, snapshot: Snapshot, *, is_trainable: bool, allow_pickle: bool,
              autocast_adapter_dtype: bool) -> nn.Module:
    """``fastpeft.load_adapter`` for a PEFT LoRA directory's ``snapshot``: the config's rules
    decide the layers, the weight file fills them; everything is checked and loaded into the
    new layers before the model is touched. Returns ``model``."""
    config, tensors = _read_lora(snapshot, allow_pickle)
    check_not_adapted(model)
    plan = plan_injection(model, config)
    _check_tensors(model, plan, config, tensors, snapshot.path)
    with restore_requires_grad(model, always=False):
        replacements = build_replacements(
            model, plan, config, init_lora_weights=True, autocast_adapter_dtype=autocast_adapter_dtype
        )
        _fill(replacements, plan, tensors)
    install(model, config, replacements, plan.modules_to_save, trainable=is_trainable)
    return model
