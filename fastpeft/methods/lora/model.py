"""Adding fastpeft LoRA layers to a model and taking them out again.

``inject`` follows PEFT's ``get_peft_model`` for the modules it changes and what it freezes,
but changes the model in place and keeps its type (no wrapper object): each target
``nn.Linear`` / ``Conv1D`` becomes a ``LoRALinear`` sharing the original weight and bias.
Every check runs before the first change, so a failing call leaves the model as it was.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from fastpeft.methods.base_layers import default_lora_dtype
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.dora_layer import DoRALinear
from fastpeft.methods.lora.layer import B_KEY, LoRALinear
from fastpeft.methods.lora.targets import InjectionPlan, LoraTarget, plan_injection
from fastpeft.methods.state import (
    AdapterState,
    check_not_adapted,
    clear_adapter,
    record_adapter,
    restore_requires_grad,
)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` for every fastpeft LoRA layer below ``model``, in model order."""
    return [(name, m) for name, m in model.named_modules() if name and isinstance(m, LoRALinear)]


def _lora_dtype(target: LoraTarget, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: float32 A and B on a float16 / bfloat16 base when
    set, else the base weight's dtype."""
    base_dtype = target.kind.base_dtype(target.module)
    return default_lora_dtype(base_dtype) if autocast_adapter_dtype else base_dtype


def build_replacements(
    model: nn.Module,
    plan: InjectionPlan,
    config: LoraConfig,
    *,
    init_lora_weights: bool | str,
    autocast_adapter_dtype: bool,
) -> dict[str, nn.Module]:
    """New modules by path, not yet installed: a ``LoRALinear`` (``DoRALinear`` with
    ``use_dora``; their quantized variants on quantized bases) per target (sharing and
    freezing its base weight) and a deep copy per ``modules_to_save`` module."""
    new: dict[str, nn.Module] = {}
    layer_cls = DoRALinear if config.use_dora else LoRALinear
    for t in plan.targets:
        new[t.name] = layer_cls.wrap(
            t.module, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora,
            lora_dtype=_lora_dtype(t, autocast_adapter_dtype), init_lora_weights=init_lora_weights,
        )
        new[t.name].train(t.module.training)
    for path in plan.modules_to_save:
        new[path] = copy.deepcopy(model.get_submodule(path))
    return new


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
    state. Warns about targets whose weight another module shares (see
    ``merge_and_unload_lora``). Nothing here can fail on a checked plan."""
    for path, module in replacements.items():
        model.set_submodule(path, module)
    model.requires_grad_(False)
    if trainable:
        for _, layer in lora_layers(model):
            for key, param in layer.adapter_tensors().items():
                param.requires_grad_(key != B_KEY or config.trains_lora_b)
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


def inject_lora(model: nn.Module, config: LoraConfig, *, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Add a LoRA adapter to ``model`` in place, as PEFT's ``get_peft_model`` would, and return
    it (``fastpeft.inject`` with a ``LoraConfig``).

    Every module ``config`` targets (PEFT's matching rules, see ``LoraConfig``) must be an
    ``nn.Linear``, transformers ``Conv1D`` or bitsandbytes ``Linear4bit`` / ``Linear8bitLt``
    (QLoRA: a ``QuantLoRALinear``); each becomes a ``LoRALinear`` sharing the base weight and
    bias (no copy), with ``r`` / ``lora_alpha`` from ``rank_pattern`` /
    ``alpha_pattern`` and PEFT's init. ``modules_to_save`` modules are replaced by trainable
    deep copies. Every other parameter is frozen. With ``autocast_adapter_dtype`` (PEFT's
    default) A and B are float32 on a float16 / bfloat16 base.

    Raises:
        ValueError: nothing matches (the message lists the model's linear layers), a match is
            not a linear layer, ``init_lora_weights`` is one fastpeft cannot create, or the
            model already has adapter layers. The model is then unchanged.
    """
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


def merge_and_unload_lora(model: nn.Module) -> nn.Module:
    """Merge every fastpeft LoRA layer into its base weight and put the plain base module
    (``nn.Linear`` / ``Conv1D``, the original object) back in its place; return ``model``.

    ``modules_to_save`` copies stay (they hold the trained weights, as PEFT's unload keeps
    them). ``requires_grad`` flags are left as they are. A layer whose base weight is tied to
    another module (GPT-2's ``lm_head`` and input embedding) gets its own merged weight, so
    the merged model computes what the adapted one did (PEFT instead merges into the shared
    weight, changing the embedding too); a transformers model's ``tie_word_embeddings``
    is then set to False. A transformers model's ``save_pretrained`` writes the whole
    (merged) model again (``fastpeft.merge_and_unload``).

    Raises:
        ValueError: the model has no fastpeft LoRA layer.
    """
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
    clear_adapter(model)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove the LoRA layers without merging them (each gives back its base module,
    unmerged first if merged); return ``model`` (``fastpeft.unload``).

    Raises:
        ValueError: the model has no fastpeft LoRA layers.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no fastpeft LoRA layers to unload")
    for name, layer in layers:
        if layer.merged:
            layer.unmerge()
        model.set_submodule(name, layer.base_module())
    clear_adapter(model)
    return model
