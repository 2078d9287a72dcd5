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
import json
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from fastpeft.formats.file_names import CONFIG_NAME, ENCODER_STATE_NAME, PEFT_WEIGHTS_NAME
from fastpeft.formats.peft import read_weights
from fastpeft.formats.saved_tensors import check_tensors, cpu_copies, cpu_copy, module_tensors
from fastpeft.formats.snapshot import Snapshot
from fastpeft.methods.prompt.config import (
    PrefixTuningConfig,
    PromptLearningConfig,
    is_prompt_peft_type,
    is_reparameterized,
    peft_type_of,
    prompt_config_from_dict,
)
from fastpeft.methods.prompt.model import (
    ENCODER_NAME,
    build_encoder,
    install_prompt,
    plan_modules_to_save,
    prompt_encoder,
    prompt_state,
    resolve_config,
)
from fastpeft.methods.prompt.prefix_encoder import PrefixEncoder
from fastpeft.methods.prompt.prompt_embedding import PTuningEncoder
from fastpeft.methods.state import check_not_adapted, restore_requires_grad

EMBEDDINGS_KEY = "prompt_embeddings"
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


def prompt_source_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's own tensors a save of its prompt-learning adapter reads: the prompt
    encoder's (the saved prompts are computed from them) and the ``modules_to_save`` copies'."""
    encoder = list(prompt_encoder(model).state_dict(keep_vars=True).values())
    return encoder + module_tensors(model, prompt_state(model).modules_to_save)


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


def saved_files(model: nn.Module) -> dict[str, bytes]:
    """The files a save of the model's prompt-learning adapter writes, name -> contents, the
    config last: PEFT's weights, and ``ENCODER_STATE_NAME`` for an encoder PEFT's file
    cannot restore (``unsaved_encoder``)."""
    files = {PEFT_WEIGHTS_NAME: safetensors.torch.save(prompt_state_dict(model), metadata={"format": "pt"})}
    encoder = encoder_state_bytes(model)
    if encoder is not None:
        files[ENCODER_STATE_NAME] = encoder
    files[CONFIG_NAME] = json.dumps(saved_prompt_config(model), indent=2, sort_keys=True).encode()
    return files


def read_config_data(snapshot: Snapshot) -> Mapping[str, Any] | None:
    """The JSON of the snapshot's ``adapter_config.json`` when it names a prompt-learning
    type, else None (unreadable files are left to the LoRA reader's errors)."""
    try:
        data = snapshot.read_json(CONFIG_NAME)
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
    check_tensors(expected, names, source, f"the {config.peft_type} adapter its config describes on this model",
                  "the config's num_virtual_tokens / token_dim / num_layers and the model")
    modules = {path: {k.removeprefix(f"{MODULE_PREFIX}{path}."): v for k, v in names.items()
                      if k.startswith(f"{MODULE_PREFIX}{path}.")} for path in paths}
    return names[EMBEDDINGS_KEY], modules


def is_prompt_directory(snapshot: Snapshot) -> bool:
    """Whether the snapshot's config names a PEFT prompt-learning type (``read_config_data``)."""
    return read_config_data(snapshot) is not None


def load_prompt_adapter(model: nn.Module, snapshot: Snapshot, *, is_trainable: bool, allow_pickle: bool) -> nn.Module:
    """``fastpeft.load_adapter`` for a PEFT prompt-tuning / prefix-tuning / P-tuning directory
    (``snapshot``, ``is_prompt_directory``). Everything is checked and built before the
    model changes.

    Raises:
        ValueError: an unsupported prompt-learning type (MULTITASK_PROMPT_TUNING, CPT, ...),
            configuration or model, wrong keys / shapes / dtypes, ``is_trainable=True`` for a
            ``prefix_projection`` or P-tuning adapter (its MLP / LSTM is not in PEFT's file),
            or a model that already has an adapter.
    """
    config = prompt_config_from_dict(read_config_data(snapshot))
    if is_reparameterized(config) and is_trainable:
        raise ValueError(f"{snapshot.path!r}: a {config.peft_type} adapter with a reparameterization "
                         "(prefix_projection, P-tuning's MLP / LSTM) is saved as its computed prompts, not its "
                         "weights (PEFT's format), so it cannot be loaded trainable; load it with is_trainable=False, "
                         "or train a new adapter")
    tensors = read_weights(snapshot, allow_pickle)
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


__all__ = [
    "EMBEDDINGS_KEY", "encoder_state_bytes", "has_prompt_adapter", "is_prompt_directory", "load_prompt_adapter",
    "prompt_state_dict", "read_config_data", "saved_files", "saved_prompt_config", "unsaved_encoder",
]
