"""Which modules of a model get LoRA, with which rank and alpha: HF PEFT's rules
(``peft.tuners.tuners_utils.check_target_module_exists``, ``_maybe_include_all_linear_layers``,
``peft.utils.other.get_pattern_key`` and ``_set_trainable``), computed without changing
the model.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from fastpeft.methods.base_layers import BASE_LAYER_KINDS, BaseLayerKind, base_layer_kind, is_linear
from fastpeft.methods.lora.config import LoraConfig, layers_pattern_regex, modules_to_save_regex, rank_pattern_regex
from fastpeft.methods.modules_to_save import find_modules_to_save
from fastpeft.methods.quantized_base import SUPPORTED as SUPPORTED_QUANTIZED
from fastpeft.methods.quantized_base import quantized_weight, unsupported_quantized_layer

# PEFT's SEQ_CLS_HEAD_NAMES: classifier heads "all-linear" leaves out for SEQ_CLS models
# without an output embedding.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


@dataclass(frozen=True)
class LoraTarget:
    """A module to wrap: its path, the module, its rank and alpha, and its kind of base layer
    (``fastpeft.methods.base_layers.BaseLayerKind``)."""

    name: str
    module: nn.Module
    r: int
    lora_alpha: float
    kind: BaseLayerKind

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the module's weight is ``[in, out]`` (transformers ``Conv1D``)."""
        return self.kind.fan_in_fan_out


@dataclass(frozen=True)
class InjectionPlan:
    """What ``inject`` changes: the LoRA targets and the ``modules_to_save`` paths, in model order."""

    targets: tuple[LoraTarget, ...]
    modules_to_save: tuple[str, ...]


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the value of the first key (in dict
    order) such that ``name`` matches ``(.*\\.)?(key)$``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rank_pattern_regex(key), name):
            return value
    return default


def _in_list(names: tuple[str, ...], key: str) -> bool:
    """PEFT's list rule: the path equals a name or ends with ``"." + name``."""
    return key in names or any(key.endswith(f".{name}") for name in names)


def is_excluded(config: LoraConfig, key: str) -> bool:
    """Excluded by ``exclude_modules``, or inside (or equal to) a ``modules_to_save`` module
    by PEFT's regex ``(^|.*\\.)name($|\\..*)``."""
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif _in_list(exclude, key):
            return True
    return any(re.match(modules_to_save_regex(name), key) for name in config.modules_to_save or ())


def _layer_index(config: LoraConfig, key: str) -> int | None:
    """The layer index in ``key``: the first numbered segment, or the one after a
    ``layers_pattern`` segment (PEFT's lazy regexes, so MoE expert indices are skipped)."""
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            match = re.match(layers_pattern_regex(pattern), key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_targeted(config: LoraConfig, target_modules: str | tuple[str, ...], key: str) -> bool:
    """PEFT's target rule for one module path (exclusions aside): a string is ``re.fullmatch``-ed;
    a list entry equal to the path matches directly, a suffix match is then narrowed by
    ``layers_to_transform``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    if not any(key.endswith(f".{name}") for name in target_modules):
        return False
    layers = config.layers_to_transform
    if layers is None or layers == ():
        return True
    index = _layer_index(config, key)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _transformers_pretrained(model: nn.Module) -> bool:
    cls = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return cls is not None and isinstance(model, cls)


def all_linear_names(model: nn.Module, config: LoraConfig) -> tuple[str, ...]:
    """PEFT's ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` path, minus a transformers
    model's output embedding (or, for ``task_type="SEQ_CLS"`` without one, its ``score`` /
    ``classifier`` head)."""
    names = [name for name, module in model.named_modules() if name and is_linear(module)]
    if not _transformers_pretrained(model):
        return tuple(names)
    head = model.get_output_embeddings()
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    excluded = {name for name, module in model.named_modules() if module is head}
    return tuple(name for name in names if name not in excluded)


def _describe_linear_layers(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if name and is_linear(module)]
    return ", ".join(names) if names else "(none)"


def plan_injection(model: nn.Module, config: LoraConfig) -> InjectionPlan:
    """Match ``config`` against ``model`` as PEFT's ``get_peft_model`` would, without touching it.

    Raises:
        ValueError: ``target_modules`` is None, or matches no module (the message lists the
            model's linear layers), or matches a module that is not ``nn.Linear`` / ``Conv1D``,
            or a module is both a LoRA target and a ``modules_to_save`` module.
    """
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is None: name the modules to adapt (a list such as "
                         "['q_proj', 'v_proj'], a regex, or 'all-linear'); fastpeft does not mirror PEFT's "
                         "per-architecture defaults")
    target_modules = all_linear_names(model, config) if config.is_all_linear else config.target_modules
    targets: list[LoraTarget] = []
    unsupported: list[str] = []
    excluded = 0
    for key, module in model.named_modules():
        if not key or not is_targeted(config, target_modules, key):
            continue
        quantizer = unsupported_quantized_layer(module)
        if is_excluded(config, key):
            excluded += 1
        elif quantizer is not None:
            unsupported.append(f"{key} ({type(module).__name__}, quantized by {quantizer})")
        elif not is_linear(module):
            unsupported.append(f"{key} ({type(module).__name__})")
        else:
            r = pattern_value(config.rank_pattern, key, config.r)
            alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
            kind = base_layer_kind(module)
            if kind.quantized:
                quantized_weight(module)  # ValueError naming the layer's problem, before any change
            targets.append(LoraTarget(key, module, r, alpha, kind))
    if unsupported:
        raise ValueError(f"target_modules matches modules fastpeft cannot wrap: {', '.join(unsupported)}; "
                         f"supported: {', '.join(k.name for k in BASE_LAYER_KINDS)} (quantized: "
                         f"{SUPPORTED_QUANTIZED} only)")
    if not targets:
        why = "all matching modules are excluded (exclude_modules / modules_to_save)" if excluded else "no module matches"
        raise ValueError(f"LoraConfig.target_modules={config.target_modules!r}: {why}. The model's linear "
                         f"layers are: {_describe_linear_layers(model)}")
    _warn_fan_in_fan_out(config, targets)
    to_save = find_modules_to_save(model, config.modules_to_save, "LoraConfig.modules_to_save")
    clash = [t.name for t in targets if any(t.name == p or t.name.startswith(f"{p}.") for p in to_save)]
    if clash:
        raise ValueError(f"modules {clash} are both LoRA targets and (inside) modules_to_save {list(to_save)}")
    return InjectionPlan(tuple(targets), to_save)


def _warn_fan_in_fan_out(config: LoraConfig, targets: list[LoraTarget]) -> None:
    """PEFT's warnings when ``fan_in_fan_out`` disagrees with a target's type (the type wins)."""
    if any(t.fan_in_fan_out != config.fan_in_fan_out for t in targets):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", stacklevel=4)
        else:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", stacklevel=4)
