"""``save_pretrained`` of a transformers model that carries a fastpeft adapter: it writes the
adapter in its native format (PEFT's for LoRA and prompt learning, as
``peft.PeftModel.save_pretrained`` does; AdapterHub's for bottleneck adapters), not the whole
model.

``fastpeft.inject`` / ``load_adapter`` change a model in place and keep its class, so the
class's ``save_pretrained`` would write every base weight (plus LoRA tensors under keys that
``from_pretrained`` ignores): for an 8B model, 16 GB where the adapter is tens of MB. HF
``Trainer`` writes its checkpoints and ``save_model()`` through ``model.save_pretrained``,
and resumes from ``model.safetensors``: the save also writes the adapter's tensors there,
under the model's own keys (the Trainer copy, ``fastpeft.formats.trainer_copy``).
``attach`` (called by ``fastpeft.api`` when an adapter is installed, with the function that
saves it, ``fastpeft.api.adapters.save_pretrained_adapter``) shadows the class's method on
the one model object with an ``AdapterSavePretrained``; ``detach`` (called by
``merge_and_unload`` / ``unload``) puts the class's back, so a merged (or unloaded) model
saves in full again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from fastpeft.formats.saved_tensors import sharded_group

# Instance attribute that shadows the class's save_pretrained.
METHOD_NAME = "save_pretrained"
# Options of transformers' save_pretrained that callers pass (push_to_hub's max_shard_size,
# accelerate's save_function, transformers 4's Trainer safe_serialization) and that do not
# apply to the adapter: it is one safetensors file, written by the main process.
IGNORED_OPTIONS = frozenset({"max_shard_size", "save_function", "safe_serialization"})


class AdapterSavePretrained:
    """The ``save_pretrained`` of one adapted transformers model, kept in its instance
    ``__dict__``. It holds the model itself and ``save(model, directory, state_dict=None)``
    (``save_pretrained_adapter``), the module-level function that writes its adapter, so
    ``copy.deepcopy`` and pickling carry it over bound to the copy."""

    def __init__(self, model: nn.Module, save: Callable[..., None]) -> None:
        self.model = model
        self.save = save

    def __call__(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the adapter to ``save_directory`` as ``fastpeft.save_adapter`` does (its type's
        native files: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` for LoRA
        and prompt learning, AdapterHub's ``adapter_config.json`` + ``adapter.safetensors``
        for bottleneck adapters), plus its Trainer copy (``model.safetensors``, the adapter's
        tensors under the model's keys, unless the directory holds a model's files), when
        ``is_main_process``; other processes write nothing (a model
        sharded with FSDP2: every process gathers the adapter and rank 0 of its mesh writes,
        ``fastpeft.save_adapter``). A
        prefix MLP or P-tuning MLP / LSTM, which PEFT's file lacks, is also written to
        ``fastpeft_prompt_encoder.safetensors`` in the same all-or-nothing save, so that
        resuming restores it.

        A ``state_dict`` (what Trainer passes under FSDP or DeepSpeed, whose parameters are
        sharded: a full state dict, gathered on the main process) is where the adapter's
        tensors are taken from, as PEFT does (``fastpeft.save_adapter(..., state_dict=...)``);
        the base's entries are ignored, and a state dict without the whole adapter (empty, as
        DeepSpeed ZeRO-3 gives without ``stage3_gather_16bit_weights_on_model_save``, or
        partial) is a ``ValueError`` rather than a weightless checkpoint.

        Raises:
            ValueError: a ``state_dict`` without the adapter's tensors whole (see above).
            TypeError: a ``save_pretrained`` option other than ``is_main_process``,
                ``state_dict`` and the ignored ``max_shard_size`` / ``save_function`` /
                ``safe_serialization`` (a full save needs ``fastpeft.merge_and_unload``).
        """
        unsupported = sorted(k for k, v in kwargs.items() if k not in IGNORED_OPTIONS and v not in (None, False))
        if unsupported:
            raise TypeError(f"save_pretrained of a model with a fastpeft adapter writes the adapter only and does not "
                            f"take {unsupported}; call fastpeft.merge_and_unload(model) first to save the whole model")
        if state_dict is not None:  # gathered already: no collective, the main process writes
            if is_main_process:
                self.save(self.model, save_directory, state_dict=state_dict)
        # a sharded model's save gathers its adapter on every rank (a collective; rank 0 of
        # its mesh writes): every process takes part, whatever is_main_process says
        elif is_main_process or sharded_group(self.model) is not None:
            self.save(self.model, save_directory)


def is_pretrained_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    cls = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return cls is not None and isinstance(model, cls)


def attach(model: nn.Module, save: Callable[..., None]) -> None:
    """Give a transformers model the adapter-only ``save_pretrained``, which writes with
    ``save(model, directory, state_dict=None)``; other modules have none to replace and are left alone.
    Idempotent."""
    if is_pretrained_model(model) and not isinstance(model.__dict__.get(METHOD_NAME), AdapterSavePretrained):
        object.__setattr__(model, METHOD_NAME, AdapterSavePretrained(model, save))


def detach(model: nn.Module) -> None:
    """Put the class's ``save_pretrained`` back (a no-op if ``attach`` did not replace it)."""
    if isinstance(model.__dict__.get(METHOD_NAME), AdapterSavePretrained):
        del model.__dict__[METHOD_NAME]
