"""The bookkeeping every adaptation method shares on a model it adapts: the ``AdapterState``
recorded on the model (its config, its ``modules_to_save`` copies, a method's placement),
the checks before a method adds anything, and parameter counts.

A method records the state when it installs its layers (``record_adapter``) and clears it
when they are removed (``clear_adapter``); the public API (``fastpeft.api``) adds what sits
above the methods, such as a transformers model's adapter-only ``save_pretrained``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.nn as nn

from fastpeft.methods.base_layers import AdapterLayer
from fastpeft.methods.quantized_base import parameter_elements

# PEFT's TaskType values, which every method's config takes.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Attribute under which an adapted model keeps its AdapterState.
ADAPTER_ATTR = "_fastpeft_adapter"


@dataclass(frozen=True)
class AdapterState:
    """What ``save_adapter`` needs to know about an adapted model: its config (a method's
    config: ``LoraConfig``, ``AdapterConfig``, a prompt-learning config), the paths of its
    ``modules_to_save`` copies, and what the method placed that the model's modules do not
    show by themselves (its own record, opaque here: for bottleneck adapters their modules
    and hooks, ``fastpeft.methods.bottleneck.placement.BottleneckPlacement``; None for the
    methods whose layers replace the model's modules)."""

    config: Any
    modules_to_save: tuple[str, ...]
    placement: Any = None


class ParameterCount(NamedTuple):
    """Parameter counts of a model (shared parameters counted once); ``percent`` is
    ``100 * trainable / total``. ``str()`` gives PEFT's ``print_trainable_parameters`` line."""

    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def require_module(model: object) -> nn.Module:
    """``model`` if it is an ``nn.Module``; TypeError naming its type otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The model's adapter state (set by ``inject``, ``load_adapter``, ``from_peft``), or None."""
    return getattr(model, ADAPTER_ATTR, None)


# transformers' Trainer refuses to train a quantized model (``is_quantized``, set by its
# quantizers) unless trainable adapters are attached, which it reads from the flag its own PEFT
# integration sets (``trainer_utils.validate_quantization_for_training``). A quantized model
# carrying a fastpeft adapter is such a model: the flag is set while the adapter is on (and
# only by fastpeft if it was not set already). Besides that check, transformers reads it in
# save_pretrained (fastpeft's own replaces it on an adapted model), in its own adapter methods
# (``load_adapter``, ``active_adapters``: transformers' PEFT integration, not fastpeft's), and to
# make activation checkpointing's inputs require grad, which the adapter needs too.
_TRANSFORMERS_ADAPTER_FLAG = "_hf_peft_config_loaded"
_FLAG_SET = "_fastpeft_set_hf_adapter_flag"


def record_adapter(model: nn.Module, state: AdapterState) -> None:
    """Mark ``model`` as carrying the adapter ``state`` describes (its layers installed)."""
    setattr(model, ADAPTER_ATTR, state)
    if getattr(model, "is_quantized", False) and not getattr(model, _TRANSFORMERS_ADAPTER_FLAG, False):
        setattr(model, _TRANSFORMERS_ADAPTER_FLAG, True)
        setattr(model, _FLAG_SET, True)


def clear_adapter(model: nn.Module) -> None:
    """Forget the model's adapter state (its layers removed); a no-op without one."""
    if adapter_state(model) is not None:
        delattr(model, ADAPTER_ATTR)
    if getattr(model, _FLAG_SET, False):
        setattr(model, _TRANSFORMERS_ADAPTER_FLAG, False)
        delattr(model, _FLAG_SET)


def check_not_adapted(model: nn.Module) -> None:
    """Refuse a model that already has fastpeft or HF PEFT adapter layers, or a fastpeft adapter."""
    layers = [(name, m) for name, m in model.named_modules() if name and isinstance(m, AdapterLayer)]
    if layers:
        raise ValueError(f"model already has fastpeft {layers[0][1].ADAPTER_KIND} layers "
                         f"({', '.join(name for name, _ in layers[:3])}, ...); call fastpeft.merge_and_unload(model) "
                         "or fastpeft.unload(model) before adding another adapter")
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


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """``(trainable, total, percent)`` over ``model.parameters()`` (each shared parameter once;
    a bitsandbytes 4-bit weight counts the elements it packs, as PEFT counts them)."""
    params = list(require_module(model).parameters())
    total = sum(parameter_elements(p) for p in params)
    trainable = sum(parameter_elements(p) for p in params if p.requires_grad)
    return ParameterCount(trainable, total, 100.0 * trainable / total if total else 0.0)
