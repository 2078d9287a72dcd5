"""AdapterHub's (``adapters`` 1.3.0) bottleneck-adapter directories, read and written.

A directory written by AdapterHub's ``model.save_adapter(dir, name, use_safetensors=True)``
holds ``adapter_config.json``::

    {"config": {<BnConfig fields>}, "name": <adapter name>, "model_type": ..., "hidden_size": ...,
     "model_class": ..., "model_name": ..., "version": "adapters.1.3.0"}

and ``adapter.safetensors`` (``pytorch_adapter.bin``, a pickle, without ``use_safetensors``),
whose keys are the adapted model's ``state_dict`` keys of the adapter's parameters:
``<layer>.<position>.adapters.<name>.adapter_down.0.weight`` / ``.adapter_down.0.bias`` /
``.adapter_up.weight`` / ``.adapter_up.bias`` (and ``.scaling`` with ``scaling="learned"``),
where ``<position>`` is ``attention.output`` / ``output`` (BERT) or ``attention_adapters`` /
``output_adapters`` (Llama, GPT-2)
(``fastpeft.methods.bottleneck.placement.PlannedSite.hub_prefix``). Keys may carry the base
model's prefix (``bert.``, ``model.``, ``transformer.``) or not, depending on the class that
saved them; as AdapterHub, fastpeft adds or drops it to fit the model. A
prediction head saved beside the adapter (``head_config.json``) is not loaded (a warning
says so). fastpeft writes ``adapter_config.json`` and ``adapter.safetensors``, which
AdapterHub reads with ``model.load_adapter(dir, use_safetensors=True)``.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from fastpeft._version import __version__
from fastpeft.formats.file_names import CONFIG_NAME, HUB_PICKLE_NAME, HUB_WEIGHTS_NAME
from fastpeft.formats.saved_tensors import check_tensors, cpu_copies
from fastpeft.formats.snapshot import Snapshot
from fastpeft.methods.bottleneck import placement
from fastpeft.methods.bottleneck.config import AdapterConfig
from fastpeft.methods.bottleneck.model import check_can_place, install, placed_bottleneck
from fastpeft.methods.state import adapter_state

# AdapterHub's prediction-head files, saved beside an adapter by its flexible-head models.
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
# AdapterHub's files of compositions: AdapterFusion layers and saved adapter setups (Stack, ...).
COMPOSITION_FILES = {
    "adapter_fusion_config.json": "AdapterFusion",
    "adapter_setup.json": "an adapter setup (Stack / Fuse / Parallel ... compositions)",
}
# AdapterHub renames activations of files without a "version" (adapter-transformers v1).
LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
# Old AdapterHub module names in weight keys, and their current name (AdapterHub's
# ``AdapterLoader.legacy_weights_mapping``).
LEGACY_KEY_PARTS = {
    "attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
    "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters",
}
# One adapter's parameters: AdapterHub's key suffix -> (fastpeft module attribute, parameter).
PARAMETERS = {
    "adapter_down.0.weight": ("adapter_down", "weight"),
    "adapter_down.0.bias": ("adapter_down", "bias"),
    "adapter_up.weight": ("adapter_up", "weight"),
    "adapter_up.bias": ("adapter_up", "bias"),
}
SCALING_KEY = "scaling"


def is_adapterhub_directory(snapshot: Snapshot) -> bool:
    """Whether the snapshot holds an AdapterHub adapter: an AdapterHub weight file, and no
    ``peft_type`` in its ``adapter_config.json`` (PEFT's mark)."""
    if not (snapshot.exists(HUB_WEIGHTS_NAME) or snapshot.exists(HUB_PICKLE_NAME)):
        return False
    try:
        data = snapshot.read_json(CONFIG_NAME)
    except (OSError, ValueError):
        return True  # AdapterHub's reader reports the broken config
    return not (isinstance(data, dict) and "peft_type" in data)


def _base_prefix(model: nn.Module) -> str:
    """The transformers base-model attribute (``bert``, ``model``, ``transformer``) when the
    model has one (a model with a head), else ""."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def _model_keys(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File keys as paths of ``model``: legacy module names renamed, the base-model prefix
    added or dropped as the model needs (AdapterHub's rule)."""
    prefix = _base_prefix(model) or getattr(model, "base_model_prefix", "")
    has_base = bool(_base_prefix(model))
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key
        for old, new in LEGACY_KEY_PARTS.items():
            name = name.replace(old, new)
        if prefix:
            if has_base and not name.startswith(prefix + "."):
                name = f"{prefix}.{name}"
            elif not has_base and name.startswith(prefix + "."):
                name = name[len(prefix) + 1:]
        if name in out:
            raise ValueError(f"adapter file key {key!r} duplicates another key once AdapterHub's prefixes are fitted "
                             "to the model")
        out[name] = value
    return out


def _expected(plan: list[placement.PlannedSite], config: AdapterConfig, name: str) -> dict[str, tuple[int, ...]]:
    """AdapterHub's key -> shape of every tensor of the adapter ``config`` places by ``plan``."""
    out = {}
    for site in plan:
        prefix = site.hub_prefix(name)
        d, r = site.hidden_size, site.bottleneck_size
        out.update({f"{prefix}adapter_down.0.weight": (r, d), f"{prefix}adapter_down.0.bias": (r,),
                    f"{prefix}adapter_up.weight": (d, r), f"{prefix}adapter_up.bias": (d,)})
        if config.scaling == "learned":
            out[f"{prefix}{SCALING_KEY}"] = (1,)
    return out


def _read_config(snapshot: Snapshot) -> tuple[AdapterConfig, str, dict[str, Any]]:
    """``(config, adapter name, the whole JSON)`` of an AdapterHub ``adapter_config.json``."""
    for file, what in COMPOSITION_FILES.items():
        if snapshot.exists(file):
            raise ValueError(f"{snapshot.path!r} holds {file}: {what} is not implemented in fastpeft; load single "
                             "bottleneck adapters")
    data = snapshot.read_json(CONFIG_NAME)
    path = snapshot.file_path(CONFIG_NAME)
    if not isinstance(data, dict) or "config" not in data or not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError(f"{path!r} is not an AdapterHub adapter config (expected a JSON object with 'config' and "
                         "a non-empty 'name')")
    name = data["name"]
    if "." in name:
        raise ValueError(f"{path!r}: adapter name {name!r} contains '.', which AdapterHub's keys cannot hold")
    raw = data["config"]
    if isinstance(raw, dict) and "version" not in data and raw.get("non_linearity") in LEGACY_ACTIVATIONS:
        raw = {**raw, "non_linearity": LEGACY_ACTIVATIONS[raw["non_linearity"]]}
    return AdapterConfig.from_dict(raw), name, data


def _check_model(model: nn.Module, data: dict[str, Any], source: str) -> None:
    """The config's ``model_type`` / ``hidden_size`` (when present) must be the model's."""
    model_config = getattr(model, "config", None)
    for key in ("model_type", "hidden_size"):
        saved, ours = data.get(key), getattr(model_config, key, None)
        if saved is not None and ours is not None and saved != ours:
            raise ValueError(f"{source}: the adapter was saved for {key} {saved!r}, the model has {ours!r}")


@torch.no_grad()
def _fill(adapters: list[torch.nn.Module], plan: list[placement.PlannedSite], name: str,
          tensors: dict[str, torch.Tensor]) -> None:
    for site, adapter in zip(plan, adapters, strict=True):
        prefix = site.hub_prefix(name)
        for suffix, (module, param) in PARAMETERS.items():
            getattr(getattr(adapter, module), param).copy_(tensors[prefix + suffix])
        if adapter.learned_scaling:
            adapter.scaling.copy_(tensors[prefix + SCALING_KEY])


def load_adapterhub(
    model: nn.Module,
    snapshot: Snapshot,
    *,
    is_trainable: bool,
    allow_pickle: bool,
    autocast_adapter_dtype: bool,
) -> nn.Module:
    """``fastpeft.load_adapter`` for an AdapterHub directory's ``snapshot`` (see the module docstring):
    the adapter is placed where AdapterHub would place it, named as saved; frozen unless
    ``is_trainable``. Everything is checked and loaded into the new modules before the model
    is touched: on any error the model is unchanged.

    Raises:
        FileNotFoundError: no config or weight file.
        ValueError: unreadable files, a method or feature fastpeft does not implement
            (another AdapterHub method, PHM, invertible adapters, gating, fusion, ...), an
            adapter saved for another model type or width, missing / unexpected keys, wrong
            shapes, a pickle without ``allow_pickle``, or a model that already has adapters.
    """
    source = snapshot.path
    config, name, data = _read_config(snapshot)
    _check_model(model, data, source)
    tensors = snapshot.read_weights(HUB_WEIGHTS_NAME, HUB_PICKLE_NAME, allow_pickle)
    check_can_place(model)
    plan = placement.plan_bottleneck(model, config)
    tensors = _model_keys(model, tensors)
    expected = {key: (shape, None) for key, shape in _expected(plan, config, name).items()}  # floating, any dtype
    check_tensors(expected, tensors, source, "the bottleneck adapter its config places in this model",
                  "the config's reduction_factor and the model's hidden_size")
    adapters = placement.build_adapters(model, plan, config, autocast_adapter_dtype)
    _fill(adapters, plan, name, tensors)
    heads = [file for file in HEAD_FILES if snapshot.exists(file)]
    install(model, config, name, plan, adapters, trainable=is_trainable)
    if heads:
        warnings.warn(f"{source} also holds an AdapterHub prediction head ({', '.join(heads)}); fastpeft loads the "
                      "adapter only and keeps the model's own head", stacklevel=3)
    return model


def adapterhub_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The bottleneck adapter's parameters themselves under AdapterHub's keys for this model
    (what ``fastpeft.integrations`` copies a checkpoint into, in place)."""
    placed = placed_bottleneck(model)
    out = {}
    for site in placed.sites:
        prefix = site.planned.hub_prefix(placed.name)
        for suffix, (module, param) in PARAMETERS.items():
            out[prefix + suffix] = getattr(getattr(site.adapter, module), param)
        if site.adapter.learned_scaling:
            out[prefix + SCALING_KEY] = site.adapter.scaling
    return out


def adapterhub_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bottleneck adapter's tensors under AdapterHub's keys for this model (CPU copies)."""
    return cpu_copies(adapterhub_parameters(model))


def adapterhub_config(model: nn.Module) -> dict[str, Any]:
    """``adapter_config.json``'s contents, as AdapterHub's ``build_full_config`` writes them."""
    state_config = adapter_state(model).config
    model_config = getattr(model, "config", None)
    return {
        "config": state_config.to_dict(),
        "hidden_size": getattr(model_config, "hidden_size", None),
        "model_class": type(model).__name__,
        "model_name": getattr(model_config, "name_or_path", "") or "",
        "model_type": getattr(model_config, "model_type", None),
        "name": placed_bottleneck(model).name,
        # AdapterHub writes its own version here and reads it only to fix older files.
        "version": f"fastpeft.{__version__}",
    }


def saved_files(model: nn.Module) -> dict[str, bytes]:
    """The files a save of the model's bottleneck adapter writes, name -> contents, the config
    last: ``adapter.safetensors`` and ``adapter_config.json``."""
    weights = safetensors.torch.save(adapterhub_state_dict(model), metadata={"format": "pt"})
    return {HUB_WEIGHTS_NAME: weights,
            CONFIG_NAME: json.dumps(adapterhub_config(model), indent=2, sort_keys=True).encode()}
