"""What every adaptation method needs to know about the base layers it adapts, and the mark
of a layer that fastpeft put into a model.

* ``BASE_LAYER_KINDS``: the base layers LoRA (and multi-LoRA) wrap, first match wins:
  bitsandbytes' quantized ``Linear4bit`` / ``Linear8bitLt`` (QLoRA; they subclass
  ``nn.Linear``, so they come first), an ``nn.Linear`` holding torchao's int8 weight-only
  ``Int8Tensor`` or its ``NF4Tensor``, ``nn.Linear`` and transformers' ``Conv1D`` (weight
  ``[in, out]``). A ``BaseLayerKind`` says how to recognise one, its sizes and the dtype its
  adapters follow;
* ``default_lora_dtype``: PEFT's adapter dtype rule (float32 adapters on a 16-bit base), which
  the bottleneck adapters follow too;
* ``AdapterLayer``: the base class of the layers a method installs (``ADAPTER_KIND`` names the
  method in messages), so that a model that already carries one is recognised whatever the
  method (``fastpeft.methods.state.check_not_adapted``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn


class AdapterLayer(nn.Module):
    """Base class of the modules an adaptation method installs in a model."""

    ADAPTER_KIND = "adapter"


def default_lora_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's adapter dtype (its ``autocast_adapter_dtype=True``): float32 A and B on a
    float16 / bfloat16 base, the base's dtype otherwise."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` (GPT-2 style linear, weight ``[in, out]``), or None.

    Looked up in ``sys.modules`` rather than imported: no module can be a ``Conv1D`` unless
    transformers was imported, and fastpeft does not depend on transformers.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is a transformers ``Conv1D``."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


@dataclass(frozen=True)
class BaseLayerKind:
    """A kind of base layer an adapter can wrap: ``name`` (for messages), ``matches(module)``,
    ``fan_in_fan_out``: the weight is stored ``[in, out]`` (``Conv1D``) rather than ``[out,
    in]`` (``nn.Linear``), and ``quantized``: the weight is quantized codes (bitsandbytes,
    torchao), its sizes the module's ``in_features`` / ``out_features``."""

    name: str
    matches: Callable[[nn.Module], bool]
    fan_in_fan_out: bool
    quantized: bool = False

    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of ``module``, from its weight's shape (a quantized
        layer's attributes)."""
        if self.quantized:
            return module.in_features, module.out_features
        rows, cols = module.weight.shape
        return (rows, cols) if self.fan_in_fan_out else (cols, rows)

    def base_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype PEFT's adapter dtype rule starts from: the weight's, or for a quantized
        layer its storage dtype when that is a float (bitsandbytes' ``quant_storage``) and
        float32 otherwise (PEFT leaves its float32 adapters as they are on a uint8 base)."""
        dtype = module.weight.dtype
        return dtype if dtype.is_floating_point else torch.float32


def is_nn_linear(module: object) -> bool:
    """Whether ``module`` is a ``torch.nn.Linear`` (a subclass too)."""
    return isinstance(module, nn.Linear)


def _bitsandbytes_layer(name: str) -> Callable[[object], bool]:
    """Whether a module is bitsandbytes' ``name`` layer, looked up in ``sys.modules`` (no
    module is one unless bitsandbytes was imported; fastpeft does not depend on it)."""
    def matches(module: object) -> bool:
        cls = getattr(sys.modules.get("bitsandbytes.nn.modules"), name, None)
        return cls is not None and isinstance(module, cls)

    return matches


def _torchao_weight(name: str) -> Callable[[object], bool]:
    """Whether a module is an ``nn.Linear`` whose weight is torchao's tensor subclass ``name``
    (by class name and package: fastpeft does not depend on torchao, whose classes move between
    releases)."""
    def matches(module: object) -> bool:
        cls = type(getattr(module, "weight", None))
        return isinstance(module, nn.Linear) and cls.__name__ == name and cls.__module__.startswith("torchao.")

    return matches


BNB_4BIT = BaseLayerKind("bitsandbytes Linear4bit", _bitsandbytes_layer("Linear4bit"), False, quantized=True)
BNB_8BIT = BaseLayerKind("bitsandbytes Linear8bitLt", _bitsandbytes_layer("Linear8bitLt"), False, quantized=True)
TORCHAO_INT8 = BaseLayerKind("torch.nn.Linear with a torchao Int8Tensor weight", _torchao_weight("Int8Tensor"), False,
                             quantized=True)
TORCHAO_NF4 = BaseLayerKind("torch.nn.Linear with a torchao NF4Tensor weight", _torchao_weight("NF4Tensor"), False,
                            quantized=True)
LINEAR = BaseLayerKind("torch.nn.Linear", is_nn_linear, fan_in_fan_out=False)
CONV1D = BaseLayerKind("transformers Conv1D", is_conv1d, fan_in_fan_out=True)
# The kinds, first match wins: a kind that subclasses another's module type (or is an
# nn.Linear with a quantized weight) goes first.
BASE_LAYER_KINDS: tuple[BaseLayerKind, ...] = (BNB_4BIT, BNB_8BIT, TORCHAO_INT8, TORCHAO_NF4, LINEAR, CONV1D)


def base_layer_kind(module: nn.Module) -> BaseLayerKind | None:
    """The first of ``BASE_LAYER_KINDS`` that ``module`` is, or None."""
    return next((kind for kind in BASE_LAYER_KINDS if kind.matches(module)), None)


def require_base_layer(module: object, argument: str) -> BaseLayerKind:
    """``module``'s kind; TypeError naming ``argument`` and the kinds taken when it has none."""
    kind = base_layer_kind(module) if isinstance(module, nn.Module) else None
    if kind is None:
        raise TypeError(f"{argument} must be one of {', '.join(k.name for k in BASE_LAYER_KINDS)}, "
                        f"got {type(module).__name__}")
    return kind


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a base layer LoRA can wrap (one of ``BASE_LAYER_KINDS``)."""
    return base_layer_kind(module) is not None
