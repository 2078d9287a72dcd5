"""Saving and loading adapters in HF PEFT's on-disk format.

A PEFT LoRA directory holds ``adapter_config.json`` (the ``LoraConfig`` fields plus
``peft_type: "LORA"``) and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), whose
keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` for each LoRA
layer and ``base_model.model.<module path>.<name>`` for each entry of a ``modules_to_save``
module's state dict: what PEFT's ``save_pretrained`` writes for a ``get_peft_model`` model,
whether a plain ``nn.Module`` or a transformers model with a ``task_type``.
"""

from __future__ import annotations

import json
import os
import re

import safetensors.torch
import torch
import torch.nn as nn

from fastpeft.model import adapterhub_io, prompt_io, save_journal
from fastpeft.model.config import LoraConfig
from fastpeft.model.injection import (
    adapter_state,
    build_replacements,
    check_not_adapted,
    install,
    lora_layers,
    require_module,
    restore_requires_grad,
)
from fastpeft.model.matching import InjectionPlan, plan_injection
from fastpeft.model.saved_tensors import check_dtype, cpu_copy
from fastpeft.model.snapshot import Snapshot, open_snapshot

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# Every file a save writes or removes, in PEFT's format and AdapterHub's: a save replaces the
# ones it writes and removes the others (stale files of another save), in one commit; the
# only names a save journal may hold.
ADAPTER_FILE_NAMES = frozenset({
    CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME, prompt_io.ENCODER_STATE_NAME,
    adapterhub_io.SAFETENSORS_NAME, adapterhub_io.PICKLE_NAME,
})
# A LoRA weight key without the prefix, with or without the adapter name PEFT uses in memory.
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved keys (CPU copies), as ``save_adapter`` writes them."""
    state = adapter_state(require_module(model))
    if state is None:
        raise ValueError("model has no fastpeft adapter: add one with fastpeft.inject, load_adapter or from_peft")
    if prompt_io.has_prompt_adapter(model):
        return prompt_io.prompt_state_dict(model)
    if state.bottleneck is not None:
        return adapterhub_io.adapterhub_state_dict(model)
    out = {}
    for name, layer in lora_layers(model):
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = cpu_copy(layer.lora_A.weight)
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = cpu_copy(layer.lora_B.weight)
    for path in state.modules_to_save:
        for key, value in model.get_submodule(path).state_dict().items():
            out[f"{KEY_PREFIX}{path}.{key}"] = cpu_copy(value)
    return out


def _saved_config(model: nn.Module) -> dict:
    """The adapter's ``adapter_config.json`` contents, as PEFT writes them: ``"all-linear"``
    resolved to the adapted module paths, ``fan_in_fan_out`` as PEFT leaves it after
    wrapping ``Conv1D`` layers, ``inference_mode`` True, ``base_model_name_or_path`` from the
    transformers model when the config has none."""
    if prompt_io.has_prompt_adapter(model):
        return prompt_io.saved_prompt_config(model)
    config = adapter_state(model).config
    layers = lora_layers(model)
    data = config.to_dict()
    if config.is_all_linear:
        data["target_modules"] = sorted(name for name, _ in layers)
    data["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    data["inference_mode"] = True
    if data["base_model_name_or_path"] is None:
        name = getattr(getattr(model, "config", None), "name_or_path", None)
        data["base_model_name_or_path"] = name or None
    return data


def saved_files(model: nn.Module) -> dict[str, bytes]:
    """The files ``save_adapter`` writes for the model, name -> contents, the config last:
    PEFT's (``adapter_model.safetensors``, and for a prefix MLP / P-tuning encoder
    ``prompt_io.ENCODER_STATE_NAME``) or AdapterHub's (``adapter.safetensors``)."""
    if getattr(adapter_state(require_module(model)), "bottleneck", None) is not None:
        weights, config = adapterhub_io.serialized(model)
        return {adapterhub_io.SAFETENSORS_NAME: weights, CONFIG_NAME: config}
    files = {SAFETENSORS_NAME: safetensors.torch.save(adapter_state_dict(model), metadata={"format": "pt"})}
    encoder = prompt_io.encoder_state_bytes(model)
    if encoder is not None:
        files[prompt_io.ENCODER_STATE_NAME] = encoder
    files[CONFIG_NAME] = json.dumps(_saved_config(model), indent=2, sort_keys=True).encode()
    return files


def save_adapter(model: nn.Module, directory: str | bytes | os.PathLike) -> None:
    """Write the model's adapter to ``directory`` in PEFT's format (see the module docstring),
    so that ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it. Bottleneck
    adapters (``AdapterConfig``) are written in AdapterHub's format instead
    (``adapter_config.json`` + ``adapter.safetensors``, see ``fastpeft.model.adapterhub_io``).
    A prefix-tuning MLP or P-tuning MLP / LSTM, whose weights PEFT's file lacks (it holds
    their output), also goes to ``fastpeft_prompt_encoder.safetensors``, which PEFT ignores
    and resuming (``load_adapter_weights``) needs.

    The directory is used in place, as PEFT's ``save_pretrained`` does: created if missing
    (``os.makedirs``, umask and a setgid parent honoured), a symlink to a directory is
    written through, and the directory itself is never renamed or recreated (it may be a
    mount point or the working directory). The adapter's tensors are gathered and
    serialized before anything is written, so an error there writes nothing.

    Guarantees (``fastpeft.model.save_journal`` gives the mechanism):

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
    * the temp files, the commit record and the directory are fsynced (and a new
      directory's parent), so a save that returned survives a power loss, and one cut by a
      power loss leaves the old or the new adapter, on filesystems that honour fsync.

    New files get mode ``0o666`` less the umask, as with ``open(path, "w")``.

    Raises:
        ValueError: the model has no fastpeft adapter.
        TypeError: ``directory`` is not a str, bytes or ``os.PathLike`` path.
        NotADirectoryError: ``directory`` exists and is not a directory.
        IsADirectoryError: a directory has the name of one of the adapter's files.
        PermissionError: ``directory`` is not writable (permissions or a read-only
            filesystem); nothing in it was changed.
    """
    files = saved_files(model)
    save_journal.save_files(directory, files, removes=ADAPTER_FILE_NAMES - files.keys(), hide=(CONFIG_NAME,),
                            allowed=ADAPTER_FILE_NAMES)


def _read_config(snapshot: Snapshot) -> LoraConfig:
    return LoraConfig.from_dict(snapshot.read_json(CONFIG_NAME))


def _read_weights(snapshot: Snapshot, allow_pickle: bool) -> dict[str, torch.Tensor]:
    return snapshot.read_weights(SAFETENSORS_NAME, PICKLE_NAME, allow_pickle)


def read_lora_adapter(directory: str | bytes | os.PathLike,
                      allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA directory's ``(config, tensors)``: the tensors on the CPU under keys relative
    to the model (``_normalize_keys``), both from one save (read from one snapshot). What
    ``MultiAdapterModel`` loads.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: as ``load_adapter``.
    """
    with open_snapshot(directory, ADAPTER_FILE_NAMES) as snapshot:
        config = _read_config(snapshot)
        return config, _normalize_keys(_read_weights(snapshot, allow_pickle), snapshot.path)


def _normalize_keys(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys relative to the model: without the ``base_model.model.`` prefix and without an
    adapter name in LoRA keys (``x.lora_A.default.weight`` -> ``x.lora_A.weight``)."""
    out: dict[str, torch.Tensor] = {}
    adapters = set()
    for key, value in tensors.items():
        name = key.removeprefix(KEY_PREFIX)
        match = _LORA_KEY.fullmatch(name)
        if match and match["adapter"]:
            adapters.add(match["adapter"])
            name = f"{match['module']}.{match['kind']}.weight"
        if name in out:
            raise ValueError(f"{source}: key {key!r} duplicates another key once prefixes and adapter names are removed")
        out[name] = value
    if len(adapters) > 1:
        raise ValueError(f"{source} holds several adapters {sorted(adapters)}; load one adapter at a time")
    return out


def _check_tensors(
    model: nn.Module, plan: InjectionPlan, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """The file must hold exactly the plan's tensors, with the plan's shapes: LoRA weights
    floating point, ``modules_to_save`` entries of their module's dtype kind."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for t in plan.targets:
        out_f, in_f = t.module.weight.shape
        if t.fan_in_fan_out:
            out_f, in_f = in_f, out_f
        expected[f"{t.name}.lora_A.weight"] = ((t.r, in_f), None)
        expected[f"{t.name}.lora_B.weight"] = ((out_f, t.r), None)
    for path in plan.modules_to_save:
        for key, value in model.get_submodule(path).state_dict().items():
            expected[f"{path}.{key}"] = (tuple(value.shape), value.dtype)
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{source} does not match the adapter its config describes on this model: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for key, (shape, dtype) in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {shape} "
                             "(from the config's r / rank_pattern and the model's layer)")
        check_dtype(tensor, dtype, key, source)


@torch.no_grad()
def _fill(replacements: dict[str, nn.Module], plan: InjectionPlan, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checked tensors into the not yet installed modules."""
    for t in plan.targets:
        layer = replacements[t.name]
        layer.lora_A.weight.copy_(tensors[f"{t.name}.lora_A.weight"])
        layer.lora_B.weight.copy_(tensors[f"{t.name}.lora_B.weight"])
    for path in plan.modules_to_save:
        prefix = f"{path}."
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        replacements[path].load_state_dict(own, strict=True)


def load_adapter(
    model: nn.Module,
    directory: str | bytes | os.PathLike,
    *,
    is_trainable: bool = False,
    allow_pickle: bool = False,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add the LoRA adapter saved in ``directory`` (PEFT's format) to ``model``; return ``model``.
    An AdapterHub bottleneck-adapter directory (``adapter.safetensors`` or
    ``pytorch_adapter.bin``) is loaded by ``fastpeft.model.adapterhub_io.load_adapterhub``
    with the same options and guarantees. A PEFT ``PROMPT_TUNING`` / ``PREFIX_TUNING`` /
    ``P_TUNING`` directory is loaded by ``fastpeft.model.prompt_io.load_prompt_adapter``.

    The config's rules (``target_modules`` / ``exclude_modules``, ``layers_to_transform``,
    ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``, ...) decide the layers, as in
    ``inject``; the weights come from ``adapter_model.safetensors``, whose keys may carry
    PEFT's ``base_model.model.`` prefix and an adapter name (``lora_A.default.weight``).
    ``adapter_model.bin`` (a pickle) is read only with ``allow_pickle=True``, then with
    ``torch.load(weights_only=True)``. As PEFT's ``from_pretrained``, the adapter is frozen
    unless ``is_trainable``; ``autocast_adapter_dtype`` as in ``inject``.

    The files are read from one save (``fastpeft.model.snapshot``: a save in progress is
    waited for, one killed after its commit point completed), regular files only, capped
    in size. Everything (config, file, keys, shapes, dtypes) is checked and every tensor
    loaded into the new layers before the model is touched: on any error the model is
    unchanged.

    Raises:
        TypeError: ``directory`` is not a str, bytes or ``os.PathLike`` path.
        FileNotFoundError: ``directory`` does not exist, or has no config or weight file.
        NotADirectoryError: ``directory`` is a file, not a directory.
        ValueError: unreadable or corrupt files, an adapter file that is not a regular file
            (a directory, FIFO or device) or is too large, a peft_type other than LORA or a feature
            fastpeft does not implement, missing / unexpected keys, wrong shapes or dtypes,
            a pickle without ``allow_pickle``, or a model that already has adapter layers.
    """
    require_module(model)
    with open_snapshot(directory, ADAPTER_FILE_NAMES) as snapshot:
        if adapterhub_io.is_adapterhub_directory(snapshot):  # AdapterHub's bottleneck adapters
            return adapterhub_io.load_adapterhub(model, snapshot, is_trainable=is_trainable, allow_pickle=allow_pickle,
                                                 autocast_adapter_dtype=autocast_adapter_dtype)
        prompt_data = prompt_io.read_config_data(snapshot)
        if prompt_data is not None:  # PROMPT_TUNING / PREFIX_TUNING (other prompt types are refused there)
            return prompt_io.load_prompt_adapter(model, snapshot, prompt_data,
                                                 lambda s: _read_weights(s, allow_pickle), is_trainable=is_trainable)
        config = _read_config(snapshot)
        tensors = _normalize_keys(_read_weights(snapshot, allow_pickle), snapshot.path)
        source = snapshot.path
    check_not_adapted(model)
    plan = plan_injection(model, config)
    _check_tensors(model, plan, tensors, source)
    with restore_requires_grad(model, always=False):
        replacements = build_replacements(
            model, plan, config, init_lora_weights=True, autocast_adapter_dtype=autocast_adapter_dtype
        )
        _fill(replacements, plan, tensors)
    install(model, config, replacements, plan.modules_to_save, trainable=is_trainable)
    return model
