"""HF ``transformers.Trainer`` with a fastpeft model: checkpoints that hold only the adapter.

Saving needs nothing: ``Trainer`` writes each checkpoint and ``save_model()`` through the
model's ``save_pretrained``, which on a transformers model with a fastpeft adapter writes
the adapter in its type's native format (``fastpeft.api.pretrained_save``), so a
checkpoint holds what a PEFT (or AdapterHub) model's does: ``adapter_config.json`` and
``adapter_model.safetensors`` (LoRA, prompt / prefix / P-tuning) or ``adapter.safetensors``
(bottleneck adapters), plus optimizer, scheduler, RNG and trainer state; a prefix MLP or a
P-tuning MLP / LSTM adds ``fastpeft_prompt_encoder.safetensors`` (PEFT's file holds only
their output).

Loading them back needs nothing either under DDP or in one process: ``Trainer`` loads an
adapter-only checkpoint (``train(resume_from_checkpoint=...)``, ``load_best_model_at_end``)
only into a ``peft.PeftModel`` (an isinstance check), and for any other model reads
``model.safetensors`` non-strictly, which ``save_pretrained`` writes as the Trainer copy of
the adapter (``fastpeft.formats.trainer_copy``). ``enable_adapter_checkpoints(trainer)``
makes one trainer load the adapter files into its fastpeft model instead, in place,
checking that they describe the model's adapter (and logging no missing base keys); any
other checkpoint goes through Trainer's own code.

Sharded training (what ``tests/integrations/test_trainer_sharded.py`` runs on the CPU):

* FSDP2 with ``state_dict_type`` ``FULL_STATE_DICT`` (Trainer's default): Trainer passes
  ``save_pretrained`` accelerate's gathered state dict, from which the adapter is written
  (``fastpeft.save_adapter(..., state_dict=...)``); accelerate also writes its own whole-model
  file, which Trainer resumes from without the line. With ``SHARDED_STATE_DICT`` Trainer
  writes DCP shards only: ``enable_adapter_checkpoints`` adds the adapter to every checkpoint
  and ``save_model()`` (gathered on every rank, ``save_adapter``), and loads it back into the
  sharded model (``load_adapter_weights``: rank 0 reads, shards are scattered);
* DeepSpeed ZeRO-2, and ZeRO-3 with ``stage3_gather_16bit_weights_on_model_save``: the
  adapter comes from the state dict Trainer passes; resuming and the best model go through
  DeepSpeed's own engine checkpoint, beside it, without the line (with it, that checkpoint
  leaves the frozen base out, as Trainer's does for a PEFT model). ZeRO-3 without that option
  hands over an empty state dict: the first checkpoint raises a ``ValueError`` saying so,
  and ``enable_adapter_checkpoints`` raises it before training starts.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING

import torch.nn as nn

from fastpeft.api import pretrained_save
from fastpeft.api.adapters import save_adapter, save_pretrained_adapter
from fastpeft.integrations.adapter_checkpoint import is_adapter_checkpoint, load_adapter_weights
from fastpeft.methods.prompt.config import PrefixTuningConfig
from fastpeft.methods.state import adapter_state

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)
# TrainingArguments' gradient checkpointing switch (renamed in transformers 5).
CHECKPOINTING_ARGS = ("gradient_checkpointing", "activation_checkpointing")


def _fsdp_plugin(trainer: Trainer) -> object | None:
    """accelerate's FSDP plugin of the trainer, or None without FSDP."""
    return getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None


def _is_fsdp2(trainer: Trainer) -> bool:
    return getattr(_fsdp_plugin(trainer), "fsdp_version", 1) == 2


def _sharded_state_dicts(trainer: Trainer) -> bool:
    """Whether Trainer saves the model as FSDP's sharded state dict (``state_dict_type``
    ``SHARDED_STATE_DICT``), writing no weights through ``save_pretrained``."""
    plugin = _fsdp_plugin(trainer)
    return plugin is not None and "SHARDED_STATE_DICT" in str(getattr(plugin, "state_dict_type", ""))


def _adapted_model(trainer: Trainer, model: nn.Module) -> nn.Module | None:
    """The fastpeft model inside ``model`` (DDP / FSDP2 / torch.compile wrappers removed), or
    None when it has no adapter or Trainer's own checkpoint code must load it: DeepSpeed
    (its engine's checkpoint holds the adapter too) and FSDP1 (its flat parameters)."""
    if trainer.is_deepspeed_enabled or (trainer.is_fsdp_enabled and not _is_fsdp2(trainer)):
        return None
    model = trainer.accelerator.unwrap_model(model, keep_torch_compile=False)
    return model if adapter_state(model) is not None else None


def _check_training_args(trainer: Trainer, model: nn.Module) -> None:
    """Refuse training arguments the model's adapter cannot train under."""
    checkpointing = any(getattr(trainer.args, name, False) for name in CHECKPOINTING_ARGS)
    if checkpointing and isinstance(adapter_state(model).config, PrefixTuningConfig):
        raise ValueError("enable_adapter_checkpoints: prefix tuning does not work with gradient checkpointing (the "
                         "recomputed layers would append the prefix to the key/value cache twice; PEFT refuses it "
                         "too); train without it (TrainingArguments gradient_checkpointing / "
                         "activation_checkpointing False)")


def _check_sharding(trainer: Trainer) -> None:
    """Refuse sharded-training settings under which a checkpoint could not hold the adapter."""
    if trainer.is_deepspeed_enabled:
        zero = trainer.args.hf_deepspeed_config.config.get("zero_optimization", {})
        gathers = str(zero.get("stage3_gather_16bit_weights_on_model_save", False)).lower() not in ("false", "0")
        if zero.get("stage") == 3 and not gathers:
            raise ValueError("enable_adapter_checkpoints: DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_"
                             "save hands save_pretrained an empty state dict, so no checkpoint could hold the adapter; "
                             "set \"stage3_gather_16bit_weights_on_model_save\": true in the DeepSpeed config")
    if _sharded_state_dicts(trainer) and not _is_fsdp2(trainer):
        raise ValueError("enable_adapter_checkpoints: FSDP1 with state_dict_type SHARDED_STATE_DICT saves no weights "
                         "through save_pretrained and fastpeft cannot gather FSDP1's flat parameters; use FSDP2 "
                         "(fsdp_config version 2) or state_dict_type FULL_STATE_DICT")


def _without_frozen_weights(trainer: Trainer) -> None:
    """Under DeepSpeed: the engine ``trainer.accelerator.prepare`` makes saves its checkpoints
    without the frozen weights and loads them without requiring them, as Trainer has it do for
    a PEFT model (``exclude_frozen_parameters``, a non-strict module load): the base is not
    written into every checkpoint, and the model keeps its own (they never change)."""
    prepare = trainer.accelerator.prepare

    def _prepare(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        engine_class = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
        for engine in prepared if isinstance(prepared, tuple) else (prepared,):
            if engine_class is not None and isinstance(engine, engine_class):
                save, load = engine.save_checkpoint, engine.load_checkpoint
                engine.save_checkpoint = functools.partial(save, exclude_frozen_parameters=True)
                engine.load_checkpoint = lambda *a, **k: load(*a, **{**k, "load_module_strict": False})
        return prepared

    trainer.accelerator.prepare = _prepare


def enable_adapter_checkpoints(trainer: Trainer) -> Trainer:
    """Make ``trainer`` load the adapter-only checkpoints its fastpeft model writes through
    fastpeft, on ``train(resume_from_checkpoint=...)`` and with ``load_best_model_at_end``;
    return it. Under DDP or in one process Trainer also loads them without this (from the
    Trainer copy, ``model.safetensors``); with it, a checkpoint of another adapter config is
    refused naming the difference, and the frozen base is not logged as missing. Needed for
    FSDP2 with sharded state dicts, and to keep DeepSpeed's checkpoints free of the base.

    The trainer's ``_load_from_checkpoint`` and ``_load_best_model`` are wrapped on this
    instance (any Trainer subclass, e.g. TRL's): for a checkpoint directory holding an
    adapter and no full model, ``load_adapter_weights`` copies the saved adapter into the
    model's, in place (the optimizer and scheduler states are restored by Trainer as
    usual); anything else goes to Trainer's own method. Under FSDP2 with sharded state dicts
    ``save_model`` is wrapped too, so each checkpoint also holds the adapter; under DeepSpeed
    the engine's own checkpoints leave the frozen base out (``_without_frozen_weights``).

    Raises:
        ValueError: DeepSpeed ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` or
            FSDP1 with sharded state dicts (no checkpoint could hold the adapter), or
            ``trainer.model`` has no fastpeft adapter or is a ``peft.PeftModel``, or
            has a prefix-tuning adapter and ``trainer.args`` asks for gradient checkpointing
            (the recomputed layers would append the prefix to the key/value cache twice;
            ``inject`` refuses it too).
        TypeError: ``trainer.model`` is not a transformers ``PreTrainedModel`` (Trainer then
            saves a full state dict, not through ``save_pretrained``).
    """
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    peft_model = getattr(sys.modules.get("peft.peft_model"), "PeftModel", None)
    if peft_model is not None and isinstance(model, peft_model):
        raise ValueError("enable_adapter_checkpoints: trainer.model is a PEFT model (PeftModel); for one converted by "
                         "fastpeft.from_peft, give the Trainer the model from_peft returned")
    if adapter_state(model) is None:
        raise ValueError("enable_adapter_checkpoints: trainer.model has no fastpeft adapter "
                         "(add one with fastpeft.inject, load_adapter or from_peft before creating the Trainer)")
    if not pretrained_save.is_pretrained_model(model):
        raise TypeError(f"enable_adapter_checkpoints: trainer.model is a {type(model).__name__}, not a transformers "
                        "PreTrainedModel; Trainer saves such a model's full state dict")
    _check_training_args(trainer, model)
    _check_sharding(trainer)
    # idempotent: inject, load_adapter and from_peft attach it too
    pretrained_save.attach(model, save_pretrained_adapter)
    load_from_checkpoint = trainer._load_from_checkpoint
    load_best_model = trainer._load_best_model
    save_model = trainer.save_model

    def _save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_model(output_dir, _internal_call)
        if _sharded_state_dicts(trainer):  # Trainer wrote DCP shards only: add the adapter (every rank gathers)
            save_adapter(trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False),
                         output_dir if output_dir is not None else trainer.args.output_dir)

    def _load_from_checkpoint(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapted = _adapted_model(trainer, trainer.model if model is None else model)
        if adapted is not None and is_adapter_checkpoint(resume_from_checkpoint):
            logger.info("Loading the fastpeft adapter from %s", resume_from_checkpoint)
            load_adapter_weights(adapted, resume_from_checkpoint)
        else:
            load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model() -> None:
        best = trainer.state.best_model_checkpoint
        adapted = _adapted_model(trainer, trainer.model)
        if adapted is not None and is_adapter_checkpoint(best):
            logger.info("Loading the best fastpeft adapter from %s (score: %s)", best, trainer.state.best_metric)
            load_adapter_weights(adapted, best)
        else:
            load_best_model()

    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_best_model = _load_best_model
    trainer.save_model = _save_model
    if trainer.is_deepspeed_enabled:
        _without_frozen_weights(trainer)
    return trainer
