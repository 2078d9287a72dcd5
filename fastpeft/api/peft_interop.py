"""``from_peft``: turn a model HF PEFT has adapted into one running fastpeft's layers (LoRA,
or prompt / prefix / P-tuning encoders)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from fastpeft.api import pretrained_save
from fastpeft.api.adapters import merge_and_unload as merge_and_unload_model
from fastpeft.api.adapters import save_adapter, save_pretrained_adapter
from fastpeft.methods.base_layers import BASE_LAYER_KINDS, base_layer_kind
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.dora_layer import DoRALinear
from fastpeft.methods.lora.layer import LoRALinear
from fastpeft.methods.prompt.config import prompt_config_from_dict
from fastpeft.methods.quantized_base import quantized_weight
from fastpeft.methods.prompt.model import build_encoder, install_prompt, resolve_config
from fastpeft.methods.state import AdapterState, record_adapter, restore_requires_grad

# PEFT LoRA variants whose forward and merge are plain LoRA: MiCA only freezes lora_B, and
# the converted layer keeps PEFT's requires_grad flags (its modules are shared).
PLAIN_FORWARD_VARIANTS = ("MiCALinearVariant",)

# PEFT wrapper methods that act on PEFT's LoRA layers, which a converted model no longer has.
# After from_peft they raise instead of silently doing nothing (save_pretrained and
# merge_and_unload are redirected to fastpeft's functions instead).
_RETIRED_METHODS = (
    "unload", "merge_adapter", "unmerge_adapter", "add_adapter", "load_adapter", "set_adapter",
    "delete_adapter", "disable_adapter", "enable_adapter_layers", "disable_adapter_layers",
    "add_weighted_adapter", "inject_adapter", "set_requires_grad", "get_layer_status", "get_model_status",
)


def _unsupported(path: str, why: str) -> ValueError:
    return ValueError(f"from_peft: {path}: {why}")


def _convert_lora_linear(path: str, layer: nn.Module, adapter: str, use_rslora: bool) -> LoRALinear:
    """A ``LoRALinear`` (``DoRALinear`` for a DoRA layer) sharing ``layer``'s base weight,
    bias, ``lora_A`` and ``lora_B`` modules and DoRA magnitude (so parameters, their
    ``requires_grad`` and optimizer state carry over)."""
    if list(layer.lora_A.keys()) != [adapter]:
        raise _unsupported(path, f"has adapters {list(layer.lora_A.keys())}; fastpeft runs exactly one")
    if layer.disable_adapters or adapter not in layer.active_adapters:
        raise _unsupported(path, f"adapter {adapter!r} is disabled or not active")
    dora = bool(layer.use_dora.get(adapter)) or adapter in layer.lora_magnitude_vector
    if dora and adapter in layer.merged_adapters:
        raise _unsupported(path, "a merged DoRA layer cannot be converted (its merge scale is PEFT's); unmerge it "
                                 "first (peft_model.unmerge_adapter())")
    # lora_bias / lora_variant are absent from older PEFT layers
    if getattr(layer, "lora_bias", {}).get(adapter):
        raise _unsupported(path, "lora_bias is not implemented")
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not dora and type(variant).__name__ not in PLAIN_FORWARD_VARIANTS:
        raise _unsupported(path, f"LoRA variant {type(variant).__name__} is not implemented")
    base = layer.base_layer
    kind = base_layer_kind(base)
    if kind is None:
        raise _unsupported(path, f"base layer {type(base).__name__} is not one of "
                                 f"{', '.join(kind.name for kind in BASE_LAYER_KINDS)}")
    if kind.quantized:
        try:
            quantized_weight(base)
        except ValueError as exc:
            raise _unsupported(path, str(exc)) from exc
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        raise _unsupported(path, f"lora_dropout is a {type(dropout).__name__}, expected nn.Dropout or nn.Identity")
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    new = (DoRALinear if dora else LoRALinear).wrap(
        base, layer.r[adapter], layer.lora_alpha[adapter],
        dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        use_rslora, lora_dtype=lora_a.weight.dtype,
    )
    if not math.isclose(new.scaling, layer.scaling[adapter], rel_tol=1e-12):
        raise _unsupported(path, f"scaling {layer.scaling[adapter]} differs from lora_alpha / r ({new.scaling}); "
                                 "a scaling changed with set_scale / scale_layer is not supported")
    new.lora_A, new.lora_B = lora_a, lora_b
    if dora:
        new.lora_magnitude_vector = layer.lora_magnitude_vector[adapter].weight
    new.merged = adapter in layer.merged_adapters
    return new.train(layer.training)


def _peft_lora_linear_types() -> tuple[type, ...]:
    """PEFT's plain LoRA linear layer classes: ``lora.Linear``, and its layers over quantized
    bases (the same forward): with bitsandbytes installed ``lora.bnb.Linear4bit`` /
    ``Linear8bitLt``, with torchao ``lora.torchao.TorchaoLoraLinear``."""
    import importlib

    from peft.tuners.lora import layer

    types = [layer.Linear]
    for module, names in (("bnb", ("Linear4bit", "Linear8bitLt")), ("torchao", ("TorchaoLoraLinear",))):
        try:
            found = importlib.import_module(f"peft.tuners.lora.{module}")
        except ImportError:  # the quantizer is not installed: PEFT has no such layers then
            continue
        types += [t for t in (getattr(found, name, None) for name in names) if t is not None]
    return tuple(types)


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swap HF PEFT's LoRA layers for fastpeft's, in place, and return the underlying model.

    ``peft_model`` is a ``peft.PeftModel`` (or a ``LoraModel``) with exactly one LoRA adapter.
    Each PEFT ``lora.Linear`` (over ``nn.Linear`` or ``Conv1D``) becomes a ``LoRALinear``
    sharing its base weight and bias and its ``lora_A`` / ``lora_B`` modules (nothing is
    copied; ``requires_grad`` flags are kept), merged if PEFT had merged it; each
    ``ModulesToSaveWrapper`` is replaced by its trained copy. Outputs and gradients are the
    same. The returned model is PEFT's base model (``peft_model.get_base_model()``), now
    free of PEFT layers: use it, not the PEFT wrapper, from then on. The wrapper still runs
    the model; its ``save_pretrained`` and ``merge_and_unload`` call fastpeft's
    ``save_adapter`` / ``merge_and_unload``, and its methods that manage PEFT's layers
    (``set_adapter``, ``unload``, ``disable_adapter``, ...) raise a ``RuntimeError``.
    PEFT's MiCA variant (plain LoRA forward, ``lora_B`` frozen) converts; its flags carry over.

    Raises:
        TypeError: ``peft_model`` is not a PEFT model.
        ValueError: several adapters, a disabled adapter, DoRA / lora_bias / a LoRA variant,
            a changed scaling, other PEFT layer types (embeddings, convolutions, quantized
            layers, trainable tokens), or a config fastpeft does not implement. Nothing is
            changed then.
    """
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(peft_model, nn.Module) or not isinstance(configs, Mapping):
        raise TypeError(f"peft_model must be a peft.PeftModel or LoraModel, got {type(peft_model).__name__}")
    if len(configs) != 1:
        raise ValueError(f"from_peft: the model has adapters {list(configs)}; fastpeft runs exactly one "
                         "(delete the others with peft_model.delete_adapter)")
    (adapter, peft_config), = configs.items()
    if getattr(peft_config, "is_prompt_learning", False):
        model = _from_peft_prompt(peft_model, adapter, peft_config)
        pretrained_save.attach(model, save_pretrained_adapter)
        return model
    config = LoraConfig.from_dict(peft_config.to_dict())
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model.model

    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    lora_linear_types = _peft_lora_linear_types()
    replacements: dict[str, nn.Module] = {}
    modules_to_save: list[str] = []
    with restore_requires_grad(model, always=True):
        for path, module in model.named_modules():
            if type(module) in lora_linear_types:
                replacements[path] = _convert_lora_linear(path, module, adapter, config.use_rslora)
            elif isinstance(module, ModulesToSaveWrapper):
                if module.active_adapters != [adapter]:
                    raise _unsupported(path, f"modules_to_save adapter {adapter!r} is not active")
                replacements[path] = module.modules_to_save[adapter]
                modules_to_save.append(path)
            elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                raise _unsupported(path, f"PEFT layer type {type(module).__name__} is not supported "
                                         "(only lora.Linear over nn.Linear / Conv1D, its bitsandbytes "
                                         "Linear4bit / Linear8bitLt and torchao layers, and modules_to_save)")
        if not replacements:
            raise ValueError("from_peft: the model has no PEFT LoRA layers")
        for path, module in replacements.items():
            model.set_submodule(path, module)
    record_adapter(model, AdapterState(config, tuple(modules_to_save)))
    pretrained_save.attach(model, save_pretrained_adapter)
    _retire_peft_wrapper(peft_model, model)
    return model


def _retired(name: str) -> Callable[..., Any]:
    def method(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name}: this PEFT model was converted by fastpeft.from_peft and has no PEFT LoRA "
                           "layers left; use the model from_peft returned with fastpeft's functions "
                           "(save_adapter, load_adapter, merge_and_unload)")

    return method


def _adapter_save_pretrained(peft_model: nn.Module, model: nn.Module) -> Callable[..., None]:
    """The converted PEFT wrapper's ``save_pretrained``: ``fastpeft.save_adapter`` of
    ``model`` (on the main process), with PEFT's signature; the options it cannot honour
    raise rather than being ignored."""

    def save_pretrained(save_directory: str, safe_serialization: bool = True, selected_adapters: Any = None,
                        is_main_process: bool = True, state_dict: Any = None, **kwargs: Any) -> None:
        if not safe_serialization or state_dict is not None or kwargs:
            raise ValueError("save_pretrained on a model converted by fastpeft.from_peft writes the adapter with "
                             "fastpeft.save_adapter (safetensors, the model's own weights): safe_serialization=False, "
                             f"state_dict and {sorted(kwargs)} are not supported")
        if selected_adapters not in (None, list(peft_model.peft_config)):
            raise ValueError(f"save_pretrained: the converted model has adapter {list(peft_model.peft_config)} only")
        if is_main_process:
            save_adapter(model, save_directory)

    return save_pretrained


def _retire_peft_wrapper(peft_model: nn.Module, model: nn.Module) -> None:
    """Make the PEFT wrapper objects (``PeftModel`` and its ``LoraModel``) safe to keep using:
    forward still runs the converted model; ``save_pretrained`` writes the adapter with
    ``fastpeft.save_adapter`` and ``merge_and_unload`` is ``fastpeft.merge_and_unload``; the
    methods that manage PEFT layers raise. (PEFT's own versions would save 0 tensors and
    merge nothing, since the layers they look for are gone.)"""

    def merge_and_unload(*args: Any, **kwargs: Any) -> nn.Module:
        return merge_and_unload_model(model)

    wrappers = [peft_model] + [m for m in (getattr(peft_model, "base_model", None),) if isinstance(m, nn.Module)]
    for wrapper in wrappers:
        for name in _RETIRED_METHODS:
            if hasattr(type(wrapper), name):
                object.__setattr__(wrapper, name, _retired(name))
        if hasattr(type(wrapper), "merge_and_unload"):
            object.__setattr__(wrapper, "merge_and_unload", merge_and_unload)
    object.__setattr__(peft_model, "save_pretrained", _adapter_save_pretrained(peft_model, model))


def _from_peft_prompt(peft_model: nn.Module, adapter: str, peft_config: Any) -> nn.Module:
    """``fastpeft.from_peft`` for a PEFT prompt-tuning / prefix-tuning / P-tuning model: the
    base model gets a fastpeft encoder that shares PEFT's encoder modules (parameters,
    ``requires_grad`` and optimizer state carry over) and the trained ``modules_to_save``
    copies; returns it. Unsupported configurations raise before anything changes.
    The PEFT wrapper's forward and generate then run the converted model (no second prompt),
    its save_pretrained writes with ``fastpeft.save_adapter``."""
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    config = prompt_config_from_dict(peft_config.to_dict())
    model = peft_model.get_base_model()
    peft_encoder = peft_model.prompt_encoder[adapter]
    replacements: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            if module.active_adapters != [adapter]:
                raise ValueError(f"from_peft: {path}: modules_to_save adapter {adapter!r} is not active")
            replacements[path] = module.modules_to_save[adapter]
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise ValueError(f"from_peft: {path}: PEFT layer type {type(module).__name__} is not supported")
    config = resolve_config(model, config)
    # PEFT's inference-mode encoders hold the computed prompts / prefix and no MLP
    heads = [name for name in ("transform", "mlp_head", "lstm_head") if hasattr(peft_encoder, name)]
    encoder = build_encoder(model, config, initialize=False, stored=not heads)
    if tuple(encoder.embedding.weight.shape) != tuple(peft_encoder.embedding.weight.shape):
        raise ValueError(f"from_peft: PEFT's prompt encoder has shape {tuple(peft_encoder.embedding.weight.shape)}, "
                         f"expected {tuple(encoder.embedding.weight.shape)} from its config")
    encoder.embedding = peft_encoder.embedding
    for name in heads:
        setattr(encoder, name, getattr(peft_encoder, name))
    modules = [peft_encoder, *replacements.values()]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    install_prompt(model, config, encoder, replacements, trainable=True)
    for param, flag in flags:
        param.requires_grad_(flag)
    _retire_prompt_wrapper(peft_model, model)
    return model


def _retire_prompt_wrapper(peft_model: nn.Module, model: nn.Module) -> None:
    """Make the PEFT wrapper run the converted model: its forward / generate call the model's
    (which add the virtual tokens once), save_pretrained writes with ``save_adapter``, and
    its adapter-management methods raise."""

    for name in _RETIRED_METHODS:
        if hasattr(type(peft_model), name):
            object.__setattr__(peft_model, name, _retired(name))
    object.__setattr__(peft_model, "forward", lambda *a, **k: model(*a, **k))
    object.__setattr__(peft_model, "generate", lambda *a, **k: model.generate(*a, **k))
    object.__setattr__(peft_model, "save_pretrained", _adapter_save_pretrained(peft_model, model))
