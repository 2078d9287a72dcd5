"""Adding fastpeft LoRA layers to a model and taking them out again.

``inject`` follows PEFT's ``get_peft_model`` for the modules it changes and what it freezes,
but changes the model in place and keeps its type (no wrapper object): each target
``nn.Linear`` / ``Conv1D`` becomes a ``LoRALinear`` sharing the original weight and bias.
Every check runs before the first change, so a failing call leaves the model as it was.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

from fastpeft.layers.lora_linear import LoRALinear, default_lora_dtype
from fastpeft.model.config import LoraConfig
from fastpeft.model.matching import InjectionPlan, LoraTarget, plan_injection

if TYPE_CHECKING:
    from fastpeft.model.bottleneck_config import AdapterConfig
    from fastpeft.model.bottleneck_placement import BottleneckPlacement
    from fastpeft.model.prompt_config import PromptLearningConfig

# Attribute under which an adapted model keeps its AdapterState.
ADAPTER_ATTR = "_fastpeft_adapter"


@dataclass(frozen=True)
class AdapterState:
    """What ``save_adapter`` needs to know about an adapted model: its config and the paths of
    its ``modules_to_save`` copies (the LoRA layers are found by type); for bottleneck
    adapters (``AdapterConfig``), their placement (modules and hooks)."""

    config: LoraConfig
    modules_to_save: tuple[str, ...]
    bottleneck: BottleneckPlacement | None = None


class ParameterCount(NamedTuple):
    """Parameter counts of a model (shared parameters counted once); ``percent`` is
    ``100 * trainable / total``. ``str()`` gives PEFT's ``print_trainable_parameters`` line."""

    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def require_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The model's adapter state (set by ``inject``, ``load_adapter``, ``from_peft``), or None."""
    return getattr(model, ADAPTER_ATTR, None)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` for every fastpeft LoRA layer below ``model``, in model order."""
    return [(name, m) for name, m in model.named_modules() if name and isinstance(m, LoRALinear)]


def check_not_adapted(model: nn.Module) -> None:
    """Refuse a model that already has fastpeft or HF PEFT adapter layers, or a fastpeft adapter."""
    layers = [name for name, _ in lora_layers(model)]
    if layers:
        raise ValueError(f"model already has fastpeft LoRA layers ({', '.join(layers[:3])}, ...); "
                         "call fastpeft.merge_and_unload(model) before adding another adapter")
    tuner_layer = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    peft_layers = [name for name, m in model.named_modules() if tuner_layer and isinstance(m, tuner_layer)]
    if peft_layers:
        raise ValueError(f"model has HF PEFT adapter layers ({', '.join(peft_layers[:3])}, ...); "
                         "convert them with fastpeft.from_peft instead")
    state = adapter_state(model)
    if state is not None:
        raise ValueError(f"model already has a fastpeft {getattr(state.config, 'peft_type', 'LORA')} adapter; "
                         "one adapter per model")


@contextmanager
def restore_requires_grad(model: nn.Module, *, always: bool) -> Iterator[None]:
    """Put every parameter's ``requires_grad`` back as it was on exit (``always``) or only
    when the block raises (wrapping a layer freezes its base weight)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)

    try:
        yield
    except BaseException:
        restore()
        raise
    if always:
        restore()


def _lora_dtype(target: LoraTarget, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: float32 A and B on a float16 / bfloat16 base when
    set, else the base weight's dtype."""
    base_dtype = target.module.weight.dtype
    return default_lora_dtype(base_dtype) if autocast_adapter_dtype else base_dtype


def build_replacements(
    model: nn.Module,
    plan: InjectionPlan,
    config: LoraConfig,
    *,
    init_lora_weights: bool | str,
    autocast_adapter_dtype: bool,
) -> dict[str, nn.Module]:
    """New modules by path, not yet installed: a ``LoRALinear`` per target (sharing and
    freezing its base weight) and a deep copy per ``modules_to_save`` module."""
    new: dict[str, nn.Module] = {}
    for t in plan.targets:
        wrap = LoRALinear.from_conv1d if t.fan_in_fan_out else LoRALinear.from_linear
        new[t.name] = wrap(
            t.module, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora,
            lora_dtype=_lora_dtype(t, autocast_adapter_dtype), init_lora_weights=init_lora_weights,
        )
        new[t.name].train(t.module.training)
    for path in plan.modules_to_save:
        new[path] = copy.deepcopy(model.get_submodule(path))
    return new


def _pretrained_save() -> ModuleType:
    """``fastpeft.integrations.pretrained_save`` (adapter-only ``save_pretrained``), imported
    on first use: the integrations import the adapter I/O, which imports this module."""
    from fastpeft.integrations import pretrained_save

    return pretrained_save


def record_adapter(model: nn.Module, state: AdapterState) -> None:
    """Mark ``model`` as carrying the adapter ``state`` describes (its layers installed) and,
    on a transformers model, make ``save_pretrained`` write that adapter only."""
    setattr(model, ADAPTER_ATTR, state)
    _pretrained_save().attach(model)


def install(
    model: nn.Module,
    config: LoraConfig,
    replacements: dict[str, nn.Module],
    modules_to_save: tuple[str, ...],
    *,
    trainable: bool,
) -> None:
    """Swap the new modules in, freeze every parameter but the adapter's (all of them when not
    ``trainable``; ``lora_B`` too under PEFT's MiCA init, as PEFT does) and record the adapter
    state. A transformers model's ``save_pretrained`` then writes the adapter only, as a PEFT
    model's does (``fastpeft.integrations.pretrained_save``). Warns about targets whose weight
    another module shares (see ``merge_and_unload``). Nothing here can fail on a checked plan."""
    for path, module in replacements.items():
        model.set_submodule(path, module)
    model.requires_grad_(False)
    if trainable:
        for _, layer in lora_layers(model):
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(config.trains_lora_b)
        for path in modules_to_save:
            model.get_submodule(path).requires_grad_(True)
    record_adapter(model, AdapterState(config, modules_to_save))
    warn_tied_targets(model)


def _tied_targets(model: nn.Module) -> dict[str, list[str]]:
    """For each LoRA layer whose base weight is also a parameter of another module (a tied
    output embedding, say), the paths of those other parameters."""
    owners: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(path)
    tied = {}
    for name, layer in lora_layers(model):
        others = [p for p in owners.get(id(layer.weight), []) if p != f"{name}.weight"]
        if others:
            tied[name] = others
    return tied


def warn_tied_targets(model: nn.Module) -> None:
    """PEFT's warning for adapted layers with tied weights, and what fastpeft does about it."""
    for name, others in _tied_targets(model).items():
        warnings.warn(f"{name}'s weight is tied to {', '.join(others)}: the adapter changes {name} only, and "
                      "fastpeft.merge_and_unload gives it its own merged weight (untying it) so that the tied "
                      "module stays unchanged", stacklevel=3)


@torch.no_grad()
def _untie(model: nn.Module, name: str, layer: LoRALinear) -> None:
    """Give ``layer`` its own copy of its (tied) base weight, and tell a transformers model
    not to tie its embeddings again (on ``tie_weights()`` / ``save_pretrained``)."""
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    warnings.warn(f"merge_and_unload: {name} had a tied weight; it now has its own merged copy and the "
                  "modules it was tied to keep the base weight", stacklevel=3)


def inject(
    model: nn.Module,
    config: LoraConfig | AdapterConfig | PromptLearningConfig,
    *,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add a LoRA adapter to ``model`` in place, as PEFT's ``get_peft_model`` would, and return it.
    (An ``AdapterConfig`` adds AdapterHub's bottleneck adapters instead, see
    ``fastpeft.model.bottleneck_injection.inject_bottleneck``; a ``PromptTuningConfig`` /
    ``PrefixTuningConfig`` / ``PromptEncoderConfig`` adds virtual tokens, see
    ``fastpeft.model.prompt_injection.inject_prompt``.)

    Every module ``config`` targets (PEFT's matching rules, see ``LoraConfig``) must be an
    ``nn.Linear`` or transformers ``Conv1D``; each becomes a ``LoRALinear`` sharing the base
    weight and bias (no copy), with ``r`` / ``lora_alpha`` from ``rank_pattern`` /
    ``alpha_pattern`` and PEFT's init. ``modules_to_save`` modules are replaced by trainable
    deep copies. Every other parameter is frozen. With ``autocast_adapter_dtype`` (PEFT's
    default) A and B are float32 on a float16 / bfloat16 base. A transformers model's
    ``save_pretrained(dir)`` then writes the adapter in PEFT's format, as a PEFT model's
    does (so do HF Trainer's checkpoints), until ``merge_and_unload``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``config`` not a ``LoraConfig``.
        ValueError: nothing matches (the message lists the model's linear layers), a match is
            not a linear layer, ``init_lora_weights`` is one fastpeft cannot create, or the
            model already has adapter layers. The model is then unchanged.
    """
    require_module(model)
    from fastpeft.model.prompt_config import PromptLearningConfig  # prompt_injection imports this module

    if isinstance(config, PromptLearningConfig):
        from fastpeft.model.prompt_injection import inject_prompt

        return inject_prompt(model, config)
    from fastpeft.model.bottleneck_config import AdapterConfig

    if isinstance(config, AdapterConfig):
        from fastpeft.model.bottleneck_injection import inject_bottleneck  # it imports this module

        return inject_bottleneck(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a fastpeft.LoraConfig, AdapterConfig, PromptTuningConfig or "
                        f"PrefixTuningConfig, got {type(config).__name__}")
    init = config.init_lora_weights
    if not (isinstance(init, bool) or init.lower() == "gaussian"):
        raise ValueError(f"LoraConfig.init_lora_weights={init!r} cannot be created by fastpeft (it needs data or "
                         "rewrites the base weights); use True, False or 'gaussian', or load trained weights "
                         "with fastpeft.load_adapter")
    check_not_adapted(model)
    plan = plan_injection(model, config)
    with restore_requires_grad(model, always=False):
        replacements = build_replacements(
            model, plan, config, init_lora_weights=init, autocast_adapter_dtype=autocast_adapter_dtype
        )
    install(model, config, replacements, plan.modules_to_save, trainable=True)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every fastpeft LoRA layer into its base weight and put the plain base module
    (``nn.Linear`` / ``Conv1D``, the original object) back in its place; return ``model``.

    ``modules_to_save`` copies stay (they hold the trained weights, as PEFT's unload keeps
    them). ``requires_grad`` flags are left as they are. A layer whose base weight is tied to
    another module (GPT-2's ``lm_head`` and input embedding) gets its own merged weight, so
    the merged model computes what the adapted one did (PEFT instead merges into the shared
    weight, changing the embedding too); a transformers model's ``tie_word_embeddings``
    is then set to False. A transformers model's ``save_pretrained`` writes the whole
    (merged) model again.

    Bottleneck adapters (``AdapterConfig``) are not linear in the hidden states and cannot be
    merged: the adapter is removed only where every adapter adds exactly zero, otherwise a
    ``ValueError`` says why (``unload`` removes them).

    Raises:
        ValueError: the model has no fastpeft LoRA layer, or has bottleneck adapters that are
            not exactly zero.
    """
    if getattr(adapter_state(require_module(model)), "bottleneck", None) is not None:
        from fastpeft.model.bottleneck_injection import merge_and_unload_bottleneck

        return merge_and_unload_bottleneck(model)
    if _has_prompt_adapter(model):
        raise ValueError("a prompt-tuning / prefix-tuning / P-tuning adapter adds virtual tokens and cannot be merged "
                         "into the weights: fastpeft.merge_prefix folds its MLP, fastpeft.unload removes it")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no fastpeft LoRA layers to merge")
    tied = _tied_targets(model)
    for name, layer in layers:
        if name in tied:
            if layer.merged:
                layer.unmerge()
            _untie(model, name, layer)
        if not layer.merged:
            layer.merge()
        model.set_submodule(name, layer.base_module())
    if adapter_state(model) is not None:
        delattr(model, ADAPTER_ATTR)
    _pretrained_save().detach(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the fastpeft LoRA, bottleneck or prompt-learning adapter without merging it;
    return ``model``, which computes the base model's output again (PEFT's ``unload``).

    LoRA layers give back their base modules (unmerged first if merged); bottleneck adapters'
    modules and hooks are removed. ``modules_to_save`` copies stay, ``requires_grad`` flags
    are left as they are, and ``save_pretrained`` writes the whole model again.

    Raises:
        ValueError: the model has no fastpeft LoRA or bottleneck adapter.
    """
    if getattr(adapter_state(require_module(model)), "bottleneck", None) is not None:
        from fastpeft.model.bottleneck_injection import unload_bottleneck

        return unload_bottleneck(model)
    if _has_prompt_adapter(model):
        from fastpeft.model.prompt_injection import unload_prompt

        return unload_prompt(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no fastpeft LoRA layers or bottleneck adapters to unload")
    for name, layer in layers:
        if layer.merged:
            layer.unmerge()
        model.set_submodule(name, layer.base_module())
    if adapter_state(model) is not None:
        delattr(model, ADAPTER_ATTR)
    _pretrained_save().detach(model)
    return model


def _has_prompt_adapter(model: nn.Module) -> bool:
    from fastpeft.model.prompt_config import PromptLearningConfig

    return isinstance(getattr(adapter_state(model), "config", None), PromptLearningConfig)


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """``(trainable, total, percent)`` over ``model.parameters()`` (each shared parameter once)."""
    params = list(require_module(model).parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParameterCount(trainable, total, 100.0 * trainable / total if total else 0.0)
