"""The public model-level API: ``inject``, ``load_adapter``, ``save_adapter``,
``adapter_state_dict``, ``merge_and_unload`` and ``unload`` dispatch here to the adaptation
methods (``fastpeft.methods``) and the file formats (``fastpeft.formats``).

``METHODS`` is the method registry, keyed by config type: each ``Method`` says how to add
the method's adapter to a model, take it out (merged or not), and which files and tensors a
save writes. ``FORMATS`` is the format registry, first match wins: each ``Format`` says how
to recognise a directory (AdapterHub's, PEFT's prompt learning, PEFT's LoRA) and load it,
through one snapshot (``fastpeft.formats.snapshot``). A new method (or a variant such as
DoRA) is one entry in each.

Above the methods, this module also gives a transformers model carrying an adapter its
adapter-only ``save_pretrained`` (``fastpeft.api.pretrained_save``), and takes it away when
the adapter goes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from fastpeft.api import pretrained_save
from fastpeft.formats import adapterhub, peft_prompt, save_journal, trainer_copy
from fastpeft.formats import peft as peft_format
from fastpeft.formats.file_names import ADAPTER_FILE_NAMES, CONFIG_NAME, SAVED_FILE_NAMES, TRAINER_COPY_NAME
from fastpeft.formats.given_state_dict import adapter_entries, state_keys, substituted
from fastpeft.formats.rank_zero import broadcast_object, on_rank_zero
from fastpeft.formats import safe_write
from fastpeft.formats.safe_write import fs_path
from fastpeft.formats.saved_tensors import cpu_copies, sharded_group
from fastpeft.formats.snapshot import CopiedSnapshot, Snapshot, copy_files, open_snapshot
from fastpeft.methods.base_layers import base_layer_kind
from fastpeft.methods.bottleneck.config import AdapterConfig
from fastpeft.methods.bottleneck.model import inject_bottleneck, merge_and_unload_bottleneck, unload_bottleneck
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.model import inject_lora, merge_and_unload_lora, unload_lora
from fastpeft.methods.prompt.config import PromptLearningConfig
from fastpeft.methods.prompt.model import inject_prompt, unload_prompt
from fastpeft.methods.sharding import shard_new_modules
from fastpeft.methods.state import adapter_state, require_module

logger = logging.getLogger(__name__)


def _prompt_merge(model: nn.Module) -> nn.Module:
    raise ValueError("a prompt-tuning / prefix-tuning / P-tuning adapter adds virtual tokens and cannot be merged "
                     "into the weights: fastpeft.merge_prefix folds its MLP, fastpeft.unload removes it")


@dataclass(frozen=True)
class Method:
    """One adaptation method: its config type, how to add it to a model (``inject(model,
    config, autocast_adapter_dtype)``) and take it out, and what a save of it writes
    (``saved_files``: name -> bytes, config last) and holds (``state_dict``: saved key -> CPU
    tensor), in its format's files, and which of the model's own tensors a save reads
    (``sources``)."""

    name: str
    config_type: type
    inject: Callable[[nn.Module, Any, bool], nn.Module]
    merge_and_unload: Callable[[nn.Module], nn.Module]
    unload: Callable[[nn.Module], nn.Module]
    saved_files: Callable[[nn.Module], dict[str, bytes]]
    state_dict: Callable[[nn.Module], dict[str, torch.Tensor]]
    sources: Callable[[nn.Module], list[torch.Tensor]]


METHODS = (
    Method("LoRA", LoraConfig, lambda m, c, autocast: inject_lora(m, c, autocast_adapter_dtype=autocast),
           merge_and_unload_lora, unload_lora, peft_format.saved_files, peft_format.lora_state_dict,
           peft_format.lora_source_tensors),
    Method("bottleneck", AdapterConfig,
           lambda m, c, autocast: inject_bottleneck(m, c, autocast_adapter_dtype=autocast),
           merge_and_unload_bottleneck, unload_bottleneck, adapterhub.saved_files, adapterhub.adapterhub_state_dict,
           lambda m: list(adapterhub.adapterhub_parameters(m).values())),
    Method("prompt learning", PromptLearningConfig, lambda m, c, autocast: inject_prompt(m, c),
           _prompt_merge, unload_prompt, peft_prompt.saved_files, peft_prompt.prompt_state_dict,
           peft_prompt.prompt_source_tensors),
)
_LORA = METHODS[0]


@dataclass(frozen=True)
class LoadOptions:
    """``load_adapter``'s options, as every format's loader gets them."""

    is_trainable: bool
    allow_pickle: bool
    autocast_adapter_dtype: bool


@dataclass(frozen=True)
class Format:
    """One on-disk adapter format: ``name`` (in messages), ``detect(snapshot)`` and
    ``load(model, snapshot, options)`` (checks everything before it changes the model)."""

    name: str
    detect: Callable[[Snapshot], bool]
    load: Callable[[nn.Module, Snapshot, LoadOptions], nn.Module]


FORMATS = (
    Format("AdapterHub", adapterhub.is_adapterhub_directory,
           lambda m, s, o: adapterhub.load_adapterhub(m, s, is_trainable=o.is_trainable, allow_pickle=o.allow_pickle,
                                                      autocast_adapter_dtype=o.autocast_adapter_dtype)),
    Format("PEFT prompt learning", peft_prompt.is_prompt_directory,
           lambda m, s, o: peft_prompt.load_prompt_adapter(m, s, is_trainable=o.is_trainable,
                                                           allow_pickle=o.allow_pickle)),
    # Last: a PEFT directory of any other type is LoRA's to read (and refuse with a message
    # naming its peft_type, or the file that is missing).
    Format("PEFT LoRA", lambda s: True,
           lambda m, s, o: peft_format.load_lora(m, s, is_trainable=o.is_trainable, allow_pickle=o.allow_pickle,
                                                 autocast_adapter_dtype=o.autocast_adapter_dtype)),
)


def _method_of_config(config: object) -> Method:
    for method in METHODS:
        if isinstance(config, method.config_type):
            return method
    raise TypeError(f"config must be a fastpeft.LoraConfig, AdapterConfig, PromptTuningConfig, PrefixTuningConfig "
                    f"or PromptEncoderConfig, got {type(config).__name__}")


def method_of_model(model: nn.Module) -> Method:
    """The method of the model's adapter; LoRA when it has none recorded (LoRA layers put in
    by hand are found by type, and the LoRA functions say when there are none)."""
    state = adapter_state(require_module(model))
    return _LORA if state is None else _method_of_config(state.config)


def _require_unsharded(model: nn.Module) -> None:
    """``inject`` into a model already sharded with FSDP2 is refused: each rank would draw its
    own initial adapter."""
    if sharded_group(model) is not None:
        raise ValueError("inject: the model is already sharded with FSDP2 (fully_shard), and each rank would draw "
                         "its own initial adapter: inject first, then fully_shard (or load a saved adapter into the "
                         "sharded model with fastpeft.load_adapter on every rank)")


def _load_into_sharded(model: nn.Module, directory: str | bytes | os.PathLike, options: LoadOptions,
                       group: torch.distributed.ProcessGroup) -> None:
    """``load_adapter`` into a model sharded with FSDP2, on every rank: rank 0 reads the
    directory, every rank loads the same files and shards the new LoRA weights as FSDP units
    of their own (``shard_new_modules``). LoRA without ``modules_to_save`` on unquantized
    bases only, checked before the model changes."""
    quantized = sorted({kind.name for m in model.modules() if (kind := base_layer_kind(m)) and kind.quantized})
    if quantized:
        raise ValueError(f"load_adapter: the model is sharded with FSDP2 and has quantized layers ({quantized}), "
                         "whose quantization state FSDP2's shards lack: load the adapter first, then fully_shard")

    def read() -> dict[str, bytes]:
        with open_snapshot(directory, SAVED_FILE_NAMES) as snapshot:
            return copy_files(snapshot, ADAPTER_FILE_NAMES)

    files = broadcast_object(group, on_rank_zero(group, "read the adapter", read))
    snapshot = CopiedSnapshot(fs_path(directory), files)
    found = next(f for f in FORMATS if f.detect(snapshot))
    config = snapshot.read_json(CONFIG_NAME) if snapshot.exists(CONFIG_NAME) else None
    if found is not FORMATS[-1] or (isinstance(config, dict) and config.get("modules_to_save")):
        raise ValueError(f"load_adapter: into a model sharded with FSDP2 fastpeft loads LoRA adapters without "
                         f"modules_to_save; {snapshot.path!r} holds a {found.name} adapter"
                         f"{' with modules_to_save' if found is FORMATS[-1] else ''}: load it first, then fully_shard")
    old_parameters = {id(p) for p in model.parameters()}
    found.load(model, snapshot, options)
    shard_new_modules(model, old_parameters)


def _adapted(model: nn.Module) -> nn.Module:
    pretrained_save.attach(model, save_pretrained_adapter)
    return model


def _unadapted(model: nn.Module) -> nn.Module:
    pretrained_save.detach(model)
    return model


def inject(
    model: nn.Module,
    config: LoraConfig | AdapterConfig | PromptLearningConfig,
    *,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add an adapter to ``model`` in place, as PEFT's ``get_peft_model`` (or AdapterHub's
    ``add_adapter``) would, and return it: LoRA layers for a ``LoraConfig``
    (``fastpeft.methods.lora.model.inject_lora``), AdapterHub's bottleneck adapters for an
    ``AdapterConfig`` (``fastpeft.methods.bottleneck.model.inject_bottleneck``), virtual
    tokens for a ``PromptTuningConfig`` / ``PrefixTuningConfig`` / ``PromptEncoderConfig``
    (``fastpeft.methods.prompt.model.inject_prompt``). Every other parameter is frozen; with
    ``autocast_adapter_dtype`` (PEFT's default) the adapter is float32 on a 16-bit base.

    A transformers model's ``save_pretrained(dir)`` then writes the adapter in its format, as
    a PEFT model's does (so do HF Trainer's checkpoints), until ``merge_and_unload`` or
    ``unload``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``config`` not one of those configs.
        ValueError: the method's checks (nothing to adapt, an unsupported feature, a model
            that already has an adapter or is already sharded with FSDP2: adapt first, then
            ``fully_shard``, ...). The model is then unchanged.
    """
    require_module(model)
    _require_unsharded(model)
    return _adapted(_method_of_config(config).inject(model, config, autocast_adapter_dtype))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapter into the base weights and remove it; return ``model``, whose
    ``save_pretrained`` writes the whole model again. LoRA: each layer merged into its base
    weight (``fastpeft.methods.lora.model.merge_and_unload_lora``). Bottleneck adapters are
    not linear in the hidden states and cannot be merged: they are removed only where every
    adapter adds exactly zero, otherwise a ``ValueError`` says why (``unload`` removes them).
    Prompt learning adds tokens and cannot be merged (``merge_prefix`` folds its MLP).

    Raises:
        ValueError: the model has no fastpeft adapter to merge, or one that cannot be merged.
    """
    return _unadapted(method_of_model(model).merge_and_unload(model))


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging it; return ``model``, which computes the base
    model's output again (PEFT's ``unload``) and whose ``save_pretrained`` writes the whole
    model. ``modules_to_save`` copies stay; ``requires_grad`` flags are left as they are.

    Raises:
        ValueError: the model has no fastpeft adapter.
    """
    return _unadapted(method_of_model(model).unload(model))


def require_adapter(model: nn.Module) -> Method:
    """The method of the model's adapter; ValueError when the model has none."""
    if adapter_state(require_module(model)) is None:
        raise ValueError("model has no fastpeft adapter: add one with fastpeft.inject, load_adapter or from_peft")
    return method_of_model(model)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under its format's saved keys (CPU copies), as ``save_adapter``
    writes them.

    Raises:
        ValueError: the model has no fastpeft adapter.
    """
    return require_adapter(model).state_dict(model)


def saved_files(model: nn.Module) -> dict[str, bytes]:
    """The files ``save_adapter`` writes for the model, name -> contents, the config last.

    Raises:
        ValueError: the model has no fastpeft adapter.
    """
    return require_adapter(model).saved_files(model)


def save_adapter(model: nn.Module, directory: str | bytes | os.PathLike, *,
                 state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the model's adapter to ``directory`` in its format: PEFT's for LoRA and prompt
    learning (``peft.PeftModel.from_pretrained(base_model, directory)`` loads it), AdapterHub's
    for bottleneck adapters (``adapter_config.json`` + ``adapter.safetensors``). A
    prefix-tuning MLP or P-tuning MLP / LSTM, whose weights PEFT's file lacks (it holds their
    output), also goes to ``fastpeft_prompt_encoder.safetensors``, which PEFT ignores and
    resuming (``load_adapter_weights``) needs.

    The directory is used in place, as PEFT's ``save_pretrained`` does: created if missing
    (``os.makedirs``, umask and a setgid parent honoured), a symlink to a directory is
    written through, and the directory itself is never renamed or recreated (it may be a
    mount point or the working directory). The adapter's tensors are gathered and
    serialized before anything is written, so an error there writes nothing.

    Guarantees (``fastpeft.formats.save_journal`` gives the mechanism):

    * **all or nothing**: the adapter's files (config, weights and the encoder file) are
      replaced in one commit, and a stale file of another save (``adapter_model.bin``, an
      encoder file, the other format's weight file) is removed in the same commit. Killed at
      any moment (``kill -9``, a full disk, an I/O error), the directory holds, as every
      fastpeft reader sees it, exactly the old adapter or exactly the new one. A save killed
      after its commit point is completed by the next fastpeft load or save of the directory;
    * **readers**: fastpeft's readers (``load_adapter``, ``load_adapter_weights``,
      ``MultiAdapterModel.load_adapter``, AdapterHub and prompt directories) take a shared
      ``flock`` on the directory and wait for a save in progress, so they read one save,
      whole. PEFT, AdapterHub and other readers that take no lock see the old files, the new
      ones, or, for a few syscalls while a *changed* config is swapped (or after a kill
      there, until fastpeft next opens the directory), no ``adapter_config.json``: they fail
      loudly rather than pair one save's config with another's weights. With an unchanged
      config (a training run's checkpoints) only the weight file is replaced, by one
      rename, which every reader sees atomically;
    * other files in the directory are never read, moved or rewritten, except temp files
      ``.<name>.tmp-<pid>-<random>`` of earlier saves whose writer is dead, which are removed;
    * concurrent saves to one directory (processes or threads) are serialized by an
      exclusive ``flock`` on it: each succeeds and the directory ends up holding one of
      them, whole. On a filesystem without directory locks (some NFS mounts) neither saves
      nor readers are serialized: concurrent ones may mix, and stale temp files stay;
    * the temp files, the commit record and the directory are fsynced (and every directory
      the save creates, in its parent), so a save that returned survives a power loss, and
      one cut by a power loss leaves the old or the new adapter, on filesystems that honour
      fsync.

    New files get mode ``0o666`` less the umask, as with ``open(path, "w")``.

    A model sharded with FSDP2 (``fully_shard``: its parameters are ``DTensor`` s): call it on
    every rank of the mesh, as every collective. Each rank gathers the adapter's tensors (only
    those, never the base weights), rank 0 writes the directory, and every rank returns once
    it is written (or raises rank 0's error).

    With ``state_dict`` (keyed as ``model.state_dict()``: a full state dict gathered by FSDP,
    ``torch.distributed.checkpoint``'s ``get_model_state_dict(..., full_state_dict=True)`` or
    DeepSpeed ZeRO-3's 16-bit one), the adapter's tensors are taken from it instead of from
    the model (``fastpeft.formats.given_state_dict``): no collective runs, so call it on the
    one process that writes. Entries of the base are ignored.

    Raises:
        ValueError: the model has no fastpeft adapter; ``state_dict`` is empty, lacks some of
            the adapter's tensors (partial), or holds a shard, a wrong shape or dtype for one.
        TypeError: ``directory`` is not a str, bytes or ``os.PathLike`` path.
        NotADirectoryError: ``directory`` exists and is not a directory.
        IsADirectoryError: a directory has the name of one of the adapter's files.
        PermissionError: ``directory`` is not writable (permissions or a read-only
            filesystem); nothing in it was changed.
    """
    _save(model, directory, state_dict, with_trainer_copy=False)


def save_pretrained_adapter(model: nn.Module, directory: str | bytes | os.PathLike, *,
                            state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """``save_adapter``, plus the Trainer copy (``fastpeft.formats.trainer_copy``: the
    adapter's tensors under the model's own keys in ``model.safetensors``, from which HF
    Trainer resumes) in the same commit, unless the directory holds a transformers model's
    files: what an adapted transformers model's ``save_pretrained`` writes."""
    _save(model, directory, state_dict, with_trainer_copy=True)


def _save(model: nn.Module, directory: str | bytes | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None,
          with_trainer_copy: bool) -> None:
    """``save_adapter`` (see there); ``with_trainer_copy``: also the Trainer copy. The adapter's
    tensors under the model's keys (from ``state_dict``, or, for the copy, the model's own
    gathered once) stand in for the model's while its files are formed (``substituted``)."""
    method = require_adapter(model)
    sources = method.sources(model)
    group = None if state_dict is not None else sharded_group(model)
    if state_dict is not None:
        entries = adapter_entries(model, sources, state_dict)
    elif with_trainer_copy:  # gathers a sharded model's tensors: on every rank, in the same order
        entries = cpu_copies(dict(zip(state_keys(model, sources), sources)))
    else:
        entries = {}
    with substituted(model, entries):
        files = method.saved_files(model)
    copy = None if not with_trainer_copy else cpu_copies(entries) if state_dict is not None else entries
    if group is None:
        _write_files(directory, files, copy)
        return
    on_rank_zero(group, "write the adapter", lambda: _write_files(directory, files, copy))


def _write_files(directory: str | bytes | os.PathLike, files: dict[str, bytes],
                 copy: dict[str, torch.Tensor] | None) -> None:
    """``save_adapter``'s one all-or-nothing commit of an adapter's ``files``, with the Trainer
    ``copy`` (unless the directory holds a model's files: then logged and left out), or, given
    none, removing an earlier save's copy. Whether the directory holds a copy or a model is
    read once the save holds the directory's lock (``save_journal.save_files``'s ``adjust``),
    so no other fastpeft save changes it in between."""
    removes = ADAPTER_FILE_NAMES - files.keys()
    copy_bytes = trainer_copy.copy_bytes(copy) if copy is not None else None

    def adjust(target: safe_write.Directory) -> tuple[dict[str, bytes], frozenset[str]]:
        has_copy, model_files = trainer_copy.found_in_directory(target)
        if copy_bytes is not None and not model_files:
            return {TRAINER_COPY_NAME: copy_bytes, **files}, removes  # the config stays last
        if copy_bytes is not None:
            logger.info("save_pretrained: %s holds a model's files (%s), so the adapter is saved without the copy "
                        "Trainer resumes from (model.safetensors)", target.path, ", ".join(model_files))
        return files, (removes | {TRAINER_COPY_NAME}) if has_copy else removes

    save_journal.save_files(directory, files, removes=removes, hide=(CONFIG_NAME,), allowed=SAVED_FILE_NAMES,
                            adjust=adjust)


def load_adapter(
    model: nn.Module,
    directory: str | bytes | os.PathLike,
    *,
    is_trainable: bool = False,
    allow_pickle: bool = False,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model``; return ``model``. The directory's
    format decides the method: AdapterHub's bottleneck adapters (``adapter.safetensors`` or
    ``pytorch_adapter.bin``, ``fastpeft.formats.adapterhub.load_adapterhub``), PEFT's
    ``PROMPT_TUNING`` / ``PREFIX_TUNING`` / ``P_TUNING`` (``fastpeft.formats.peft_prompt``),
    or PEFT's LoRA (``fastpeft.formats.peft.load_lora``).

    For LoRA the config's rules (``target_modules`` / ``exclude_modules``,
    ``layers_to_transform``, ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``, ...) decide
    the layers, as in ``inject``; the weights come from ``adapter_model.safetensors``, whose
    keys may carry PEFT's ``base_model.model.`` prefix and an adapter name
    (``lora_A.default.weight``). A pickle (``adapter_model.bin``, ``pytorch_adapter.bin``) is
    read only with ``allow_pickle=True``, then with ``torch.load(weights_only=True)``. As
    PEFT's ``from_pretrained``, the adapter is frozen unless ``is_trainable``;
    ``autocast_adapter_dtype`` as in ``inject``.

    The files are read from one save (``fastpeft.formats.snapshot``: a save in progress is
    waited for, one killed after its commit point completed), regular files only, capped
    in size. Everything (config, file, keys, shapes, dtypes) is checked and every tensor
    loaded into the new layers before the model is touched: on any error the model is
    unchanged.

    A model already sharded with FSDP2 (``fully_shard``, before its first forward): call it on
    every rank, as a collective. Rank 0 reads the directory, every rank loads the same files,
    and the new ``lora_A`` / ``lora_B`` become FSDP units of their own on the model's mesh
    (the layers read the base weights where FSDP2 gathers them and call those units). LoRA
    adapters without ``modules_to_save`` on unquantized layers only; anything else: load
    first, then shard.

    Raises:
        TypeError: ``directory`` is not a str, bytes or ``os.PathLike`` path.
        FileNotFoundError: ``directory`` does not exist, or has no config or weight file.
        NotADirectoryError: ``directory`` is a file, not a directory.
        ValueError: unreadable or corrupt files, an adapter file that is not a regular file
            (a directory, FIFO or device) or is too large, a peft_type or feature fastpeft
            does not implement, missing / unexpected keys, wrong shapes or dtypes, a pickle
            without ``allow_pickle``, or a model that already has adapter layers; into a model
            sharded with FSDP2, anything but a LoRA adapter without ``modules_to_save`` on
            unquantized layers.
    """
    require_module(model)
    options = LoadOptions(is_trainable, allow_pickle, autocast_adapter_dtype)
    group = sharded_group(model)
    if group is not None:
        _load_into_sharded(model, directory, options, group)
        return _adapted(model)
    with open_snapshot(directory, SAVED_FILE_NAMES) as snapshot:
        next(f for f in FORMATS if f.detect(snapshot)).load(model, snapshot, options)
    return _adapted(model)
