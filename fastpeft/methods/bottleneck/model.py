"""Adding bottleneck adapters to a model (``fastpeft.inject`` with an ``AdapterConfig``),
removing them (``fastpeft.unload``) and why they cannot be merged (``merge_and_unload``).

As for LoRA, the model is changed in place and keeps its class, every check runs before the
first change, and every parameter but the adapters' is frozen. The public API
(``fastpeft.api.adapters``) calls these for a model whose ``AdapterState`` holds a
``BottleneckPlacement``.
"""

from __future__ import annotations

import torch.nn as nn

from fastpeft.methods.bottleneck import placement
from fastpeft.methods.bottleneck.config import AdapterConfig
from fastpeft.methods.bottleneck.layer import BottleneckAdapter
from fastpeft.methods.state import AdapterState, adapter_state, check_not_adapted, clear_adapter, record_adapter
from fastpeft.methods.state import require_module

# The adapter's name in AdapterHub's files (its ``adapters.<name>.`` keys) when the model got
# it from ``inject`` rather than from a loaded AdapterHub directory.
DEFAULT_NAME = "default"


def check_no_adapterhub_adapters(model: nn.Module) -> None:
    """Refuse a model that carries AdapterHub (``adapters`` library) adapters: its own layers
    would run them as well."""
    names = list(getattr(getattr(model, "adapters_config", None), "adapters", None) or ())
    if names:
        raise ValueError(f"model has AdapterHub adapters {names} (adapters library); fastpeft places its own: "
                         "use a model without them (save the adapter with save_adapter(..., use_safetensors=True) "
                         "and load it with fastpeft.load_adapter)")


def check_can_place(model: nn.Module) -> None:
    """The model has no fastpeft, PEFT or AdapterHub adapter yet."""
    check_not_adapted(model)
    check_no_adapterhub_adapters(model)


def install(model: nn.Module, config: AdapterConfig, name: str, plan: list[placement.PlannedSite],
            adapters: list[BottleneckAdapter], *, trainable: bool) -> None:
    """Place the built adapters, freeze every other parameter (the adapters too unless
    ``trainable``) and record the adapter state (a transformers model's ``save_pretrained``
    then writes the adapter only). Cannot fail on a checked plan."""
    placed = placement.install(model, name, plan, adapters, config)
    model.requires_grad_(False)
    if trainable:
        for adapter in adapters:
            adapter.requires_grad_(True)
    record_adapter(model, AdapterState(config, (), placed))


def inject_bottleneck(model: nn.Module, config: AdapterConfig, *, autocast_adapter_dtype: bool = True) -> nn.Module:
    """``fastpeft.inject`` for an ``AdapterConfig``: a new bottleneck adapter (named
    ``"default"`` in AdapterHub's files) at the positions AdapterHub uses for the config, in
    place; every other parameter frozen. Adapter weights are float32 on a float16 / bfloat16
    model with ``autocast_adapter_dtype``, else the model's dtype.

    Raises:
        ValueError: an unsupported model type or layout, a model that already has adapters,
            or a config that places nothing (see ``plan_bottleneck``). The model is then
            unchanged.
    """
    check_can_place(model)
    plan = placement.plan_bottleneck(model, config)
    adapters = placement.build_adapters(model, plan, config, autocast_adapter_dtype)
    install(model, config, DEFAULT_NAME, plan, adapters, trainable=True)
    return model


def placed_bottleneck(model: nn.Module) -> placement.BottleneckPlacement | None:
    """The model's placed bottleneck adapter, or None."""
    state = adapter_state(model)
    return None if state is None else state.placement


def unload_bottleneck(model: nn.Module) -> nn.Module:
    """Remove the bottleneck adapter (hooks and modules): the model computes its base output
    again. ``requires_grad`` flags are left as they are."""
    placed = placed_bottleneck(require_module(model))
    if placed is None:
        raise ValueError("model has no fastpeft bottleneck adapter")
    placement.remove(model, placed)
    clear_adapter(model)
    return model


def merge_and_unload_bottleneck(model: nn.Module) -> nn.Module:
    """Remove the adapter when that is exact (every adapter adds exactly zero: zero up
    projection and bias, or zero scaling); otherwise raise, saying why."""
    placed = placed_bottleneck(model)
    active = [path for path, adapter in placed.adapters() if not adapter.is_identity()]
    if active:
        raise ValueError(
            f"merge_and_unload: bottleneck adapters cannot be merged into the model's weights: their term "
            f"scaling * (act(x W_down^T + b_down) W_up^T + b_up) is not linear in the hidden states x (and may sit "
            f"between the model's residual add and its LayerNorm), so no change of the base weights reproduces it "
            f"({len(active)} adapters add a non-zero term, e.g. {active[0]}). Keep the adapter, or remove it with "
            "fastpeft.unload(model), which restores the base model's output")
    return unload_bottleneck(model)
