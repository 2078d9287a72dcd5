"""Prompt-tuning and prefix-tuning adapters in HF PEFT's files, and from PEFT models.

PEFT saves a prompt-learning adapter as ``adapter_config.json`` (``peft_type``
``"PROMPT_TUNING"`` / ``"PREFIX_TUNING"``, the resolved model-shape fields,
``inference_mode: true``) and ``adapter_model.safetensors`` holding:

* ``prompt_embeddings``: what the encoder computes for the virtual tokens, float32 --
  prompt tuning: the embeddings ``[num_virtual_tokens, token_dim]``; prefix tuning: the
  prefix ``[num_virtual_tokens, num_layers * 2 * token_dim]``, which with
  ``prefix_projection`` is the MLP's output, not its weights (``get_peft_model_state_dict``
  -> ``get_prompt_embedding_to_save``);
* ``base_model.<module path>.<name>`` for each ``modules_to_save`` module (a SEQ_CLS
  model's ``classifier`` / ``score``).

* P-tuning (``P_TUNING``): the prompts its MLP / LSTM computes, ``[num_virtual_tokens, token_dim]``.

So a ``prefix_projection`` or P-tuning adapter loads as its stored prefix / prompts, frozen
(PEFT's inference mode); its MLP cannot be restored from the file, and ``is_trainable=True``
is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from fastpeft.layers.prefix_encoder import PrefixEncoder
from fastpeft.layers.prompt_embedding import PTuningEncoder
from fastpeft.model.injection import check_not_adapted, restore_requires_grad
from fastpeft.model.prompt_config import (
    PrefixTuningConfig,
    PromptLearningConfig,
    is_prompt_peft_type,
    is_reparameterized,
    peft_type_of,
    prompt_config_from_dict,
)
from fastpeft.model.prompt_injection import (
    ENCODER_NAME,
    build_encoder,
    install_prompt,
    plan_modules_to_save,
    prompt_encoder,
    prompt_state,
    resolve_config,
)
from fastpeft.model.saved_tensors import check_dtype, cpu_copies, cpu_copy
from fastpeft.model.snapshot import Snapshot

EMBEDDINGS_KEY = "prompt_embeddings"
# The state dict of a prompt encoder whose trainable weights PEFT's file lacks (a prefix MLP,
# a P-tuning MLP / LSTM: PEFT saves their output), written beside PEFT's files in the same
# save so that a checkpoint can be resumed; PEFT ignores it.
ENCODER_STATE_NAME = "fastpeft_prompt_encoder.safetensors"
# PEFT's key prefix of modules_to_save entries for prompt learning (the wrapper's base_model
# is the transformers model itself, with no LoraModel in between).
MODULE_PREFIX = "base_model."


def has_prompt_adapter(model: nn.Module) -> bool:
    return prompt_state(model) is not None


def unsaved_encoder(model: nn.Module) -> nn.Module | None:
    """The model's prompt encoder when PEFT's file cannot restore it (an unmerged prefix MLP
    or P-tuning MLP / LSTM: the file holds their output), else None."""
    if not has_prompt_adapter(model):
        return None
    encoder = prompt_encoder(model)
    if isinstance(encoder, PTuningEncoder) and not encoder.merged:
        return encoder
    return encoder if isinstance(encoder, PrefixEncoder) and encoder.prefix_projection else None


def encoder_state_bytes(model: nn.Module) -> bytes | None:
    """``ENCODER_STATE_NAME``'s contents for ``model`` (its ``unsaved_encoder``'s state dict,
    CPU copies), or None when PEFT's file is enough."""
    encoder = unsaved_encoder(model)
    if encoder is None:
        return None
    return safetensors.torch.save(cpu_copies(encoder.state_dict()), metadata={"format": "pt"})


@torch.no_grad()
def saved_prompt_embeddings(model: nn.Module) -> torch.Tensor:
    """PEFT's ``prompt_embeddings`` for the model's adapter (float32, on the CPU), computed
    as at inference: the encoder in eval mode (a P-tuning encoder's dropout off) whatever
    mode the model is in, so a save during training (Trainer's checkpoints) writes the prompts
    the adapter will serve, not one dropout draw of them (PEFT computes them in the current
    mode)."""
    encoder = prompt_encoder(model)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            prompts = encoder.prefix() if isinstance(encoder, PrefixEncoder) else encoder.prompts()
    finally:
        encoder.train(was_training)
    return cpu_copy(prompts.float())


def prompt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved keys (CPU copies)."""
    state = prompt_state(model)
    out = {EMBEDDINGS_KEY: saved_prompt_embeddings(model)}
    for path in state.modules_to_save:
        for key, value in model.get_submodule(path).state_dict().items():
            out[f"{MODULE_PREFIX}{path}.{key}"] = cpu_copy(value)
    return out


def saved_prompt_config(model: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it: resolved fields, ``inference_mode`` True,
    SEQ_CLS heads in ``modules_to_save``, ``base_model_name_or_path`` from the model."""
    config: PromptLearningConfig = prompt_state(model).config
    data = config.to_dict()
    names = config.saved_modules_to_save
    data["modules_to_save"] = list(names) if names else None
    data["inference_mode"] = True
    if data["base_model_name_or_path"] is None:
        data["base_model_name_or_path"] = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return data


def read_config_data(snapshot: Snapshot) -> Mapping[str, Any] | None:
    """The JSON of the snapshot's ``adapter_config.json`` when it names a prompt-learning
    type, else None (unreadable files are left to the LoRA reader's errors)."""
    try:
        data = snapshot.read_json("adapter_config.json")
    except (OSError, ValueError):
        return None
    if isinstance(data, Mapping) and is_prompt_peft_type(peft_type_of(data)):
        return data
    return None


def _expected_shape(config: PromptLearningConfig) -> tuple[int, int]:
    """``prompt_embeddings``' shape: the prefix, or the prompts (prompt tuning, P-tuning)."""
    if isinstance(config, PrefixTuningConfig):
        return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
    return config.num_virtual_tokens, config.token_dim


def _split_tensors(
    model: nn.Module,
    config: PromptLearningConfig,
    paths: tuple[str, ...],
    tensors: dict[str, torch.Tensor],
    source: str,
) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Check the file's keys, shapes and dtypes against the adapter; return the prompt
    embeddings and each ``modules_to_save`` module's state dict."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {EMBEDDINGS_KEY: (_expected_shape(config), None)}
    for path in paths:
        for key, value in model.get_submodule(path).state_dict().items():
            expected[f"{MODULE_PREFIX}{path}.{key}"] = (tuple(value.shape), value.dtype)
    names = {k.removeprefix("model.") if k.startswith(f"{MODULE_PREFIX}model.") else k: v for k, v in tensors.items()}
    missing = sorted(expected.keys() - names.keys())
    extra = sorted(names.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{source} does not match the {config.peft_type} adapter its config describes on this "
                         f"model: missing keys {missing[:8]}, unexpected keys {extra[:8]}")
    for key, (shape, dtype) in expected.items():
        tensor = names[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {shape} (from the config's "
                             "num_virtual_tokens / token_dim / num_layers and the model)")
        check_dtype(tensor, dtype, key, source)
    modules = {path: {k.removeprefix(f"{MODULE_PREFIX}{path}."): v for k, v in names.items()
                      if k.startswith(f"{MODULE_PREFIX}{path}.")} for path in paths}
    return names[EMBEDDINGS_KEY], modules


def load_prompt_adapter(
    model: nn.Module,
    snapshot: Snapshot,
    data: Mapping[str, Any],
    read_tensors: Callable[[Snapshot], dict[str, torch.Tensor]],
    *,
    is_trainable: bool,
) -> nn.Module:
    """``fastpeft.load_adapter`` for a PEFT prompt-tuning / prefix-tuning / P-tuning directory
    (``snapshot``) whose config JSON is ``data`` (``read_tensors`` reads its weight file). Everything is
    checked and built before the model changes.

    Raises:
        ValueError: an unsupported prompt-learning type (MULTITASK_PROMPT_TUNING, CPT, ...),
            configuration or model, wrong keys / shapes / dtypes, ``is_trainable=True`` for a
            ``prefix_projection`` or P-tuning adapter (its MLP / LSTM is not in PEFT's file),
            or a model that already has an adapter.
    """
    config = prompt_config_from_dict(data)
    if is_reparameterized(config) and is_trainable:
        raise ValueError(f"{snapshot.path!r}: a {config.peft_type} adapter with a reparameterization "
                         "(prefix_projection, P-tuning's MLP / LSTM) is saved as its computed prompts, not its "
                         "weights (PEFT's format), so it cannot be loaded trainable; load it with is_trainable=False, "
                         "or train a new adapter")
    tensors = read_tensors(snapshot)
    check_not_adapted(model)
    if hasattr(model, ENCODER_NAME):
        raise ValueError(f"model already has a {ENCODER_NAME} submodule")
    config = resolve_config(model, config)
    paths = plan_modules_to_save(model, config)
    embeddings, module_states = _split_tensors(model, config, paths, tensors, snapshot.path)
    with restore_requires_grad(model, always=False):
        encoder = build_encoder(model, config, initialize=False, stored=True)
        with torch.no_grad():
            encoder.embedding.weight.copy_(embeddings)
        copies = {}
        for path in paths:
            copies[path] = copy.deepcopy(model.get_submodule(path))
            copies[path].load_state_dict(module_states[path], strict=True)
    install_prompt(model, config, encoder, copies, trainable=is_trainable)
    return model


def from_peft_prompt(peft_model: nn.Module, adapter: str, peft_config: Any) -> nn.Module:
    """``fastpeft.from_peft`` for a PEFT prompt-tuning / prefix-tuning / P-tuning model: the
    base model gets a fastpeft encoder that shares PEFT's encoder modules (parameters,
    ``requires_grad`` and optimizer state carry over) and the trained ``modules_to_save``
    copies; returns it. Unsupported configurations raise before anything changes.
    The PEFT wrapper's forward and generate then run the converted model (no second prompt),
    its save_pretrained writes with ``fastpeft.save_adapter``."""
    from fastpeft.model.peft_interop import _RETIRED_METHODS, _retired
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
    _retire_prompt_wrapper(peft_model, model, _RETIRED_METHODS, _retired)
    return model


def _retire_prompt_wrapper(peft_model: nn.Module, model: nn.Module, names: tuple[str, ...], retired) -> None:
    """Make the PEFT wrapper run the converted model: its forward / generate call the model's
    (which add the virtual tokens once), save_pretrained writes with ``save_adapter``, and
    its adapter-management methods raise."""
    from fastpeft.model.adapter_io import save_adapter

    def save_pretrained(save_directory: str, safe_serialization: bool = True, is_main_process: bool = True,
                        state_dict: Any = None, **kwargs: Any) -> None:
        if not safe_serialization or state_dict is not None:
            raise ValueError("save_pretrained on a model converted by fastpeft.from_peft writes the adapter with "
                             "fastpeft.save_adapter (safetensors, the model's own weights): safe_serialization=False "
                             "and state_dict are not supported")
        if is_main_process:
            save_adapter(model, save_directory)

    for name in names:
        if hasattr(type(peft_model), name):
            object.__setattr__(peft_model, name, retired(name))
    object.__setattr__(peft_model, "forward", lambda *a, **k: model(*a, **k))
    object.__setattr__(peft_model, "generate", lambda *a, **k: model.generate(*a, **k))
    object.__setattr__(peft_model, "save_pretrained", save_pretrained)


__all__ = [
    "EMBEDDINGS_KEY", "ENCODER_STATE_NAME", "encoder_state_bytes", "from_peft_prompt", "has_prompt_adapter",
    "load_prompt_adapter", "prompt_state_dict", "read_config_data", "saved_prompt_config", "unsaved_encoder",
]
