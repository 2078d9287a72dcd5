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
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from fastpeft.model import adapterhub_io, prompt_io, safe_write
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
from fastpeft.model.saved_tensors import cpu_copy

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
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


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the model's adapter to ``directory`` in PEFT's format (see the module docstring),
    so that ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it. Bottleneck
    adapters (``AdapterConfig``) are written in AdapterHub's format instead
    (``adapter_config.json`` + ``adapter.safetensors``, see ``fastpeft.model.adapterhub_io``),
    with the same guarantees (a stale ``pytorch_adapter.bin`` is the file removed).

    The directory is used in place, as PEFT's ``save_pretrained`` does: created if missing
    (``os.makedirs``, umask and a setgid parent honoured), a symlink to a directory is
    written through, and the directory itself is never renamed or recreated (it may be a
    mount point or the working directory). The adapter's tensors are gathered and
    serialized before anything is written, so an error there writes nothing.

    Guarantees (``_write_adapter`` gives the order of operations behind them):

    * each of ``adapter_config.json`` and ``adapter_model.safetensors`` is written to a temp
      file ``.<name>.tmp-<pid>-<random>`` beside it, fsynced and renamed over it: the name
      always holds a whole file, the old one or the new one, never a truncated one;
    * if the new ``adapter_config.json`` is byte-identical to the one in the directory (the
      usual case when a training run saves checkpoints), only the weights are replaced, by
      one rename: a crash at any point leaves exactly the old or the new adapter;
    * if the config changes (or there is none), the old config is removed just before the
      weights are replaced and the new one installed just after them: a crash (or an I/O
      error) in between leaves no ``adapter_config.json``, so fastpeft and PEFT both refuse
      to load the directory instead of pairing one adapter's config with the other's
      weights; a crash at any other point leaves the old or the new adapter. The next save
      repairs it;
    * other files in the directory are never read, moved or rewritten, with two exceptions,
      both removed once the new files are in place: a stale ``adapter_model.bin`` (shadowed
      by the new safetensors file in PEFT and fastpeft), and the temp files of earlier
      saves whose writer process is dead;
    * concurrent saves to one directory (processes or threads) are serialized by an
      exclusive ``flock`` on it: each succeeds and the directory ends up holding one of
      them, whole (a reader that takes a shared flock on the directory never sees a save
      in progress). On a filesystem without directory locks (some NFS mounts) saves are not
      serialized, concurrent ones may leave a mixed pair, and stale temp files stay;
    * the directory is fsynced after the renames, so a save that returned survives a power
      loss. A power loss during the save leaves one of the states above on filesystems that
      honour fsync and persist a directory's renames and removals in the order they were
      made (ext4, xfs and btrfs journal them in order); not on ones that do not (e.g. some
      network filesystems, or disks whose write cache ignores flushes).

    New files get mode ``0o666`` less the umask, as with ``open(path, "w")``.

    Raises:
        ValueError: the model has no fastpeft adapter.
        NotADirectoryError: ``directory`` exists and is not a directory.
        PermissionError: ``directory`` is not writable (permissions or a read-only
            filesystem); nothing in it was changed.
    """
    if getattr(adapter_state(require_module(model)), "bottleneck", None) is not None:
        weights, config = adapterhub_io.serialized(model)
        names = (adapterhub_io.SAFETENSORS_NAME, adapterhub_io.PICKLE_NAME)
    else:
        weights = safetensors.torch.save(adapter_state_dict(model), metadata={"format": "pt"})
        config = json.dumps(_saved_config(model), indent=2, sort_keys=True).encode()
        names = (SAFETENSORS_NAME, PICKLE_NAME)
    with safe_write.open_directory(directory) as target:
        _write_adapter(target, config, weights, *names)
        safe_write.remove_stale_temps(target, (CONFIG_NAME, names[0]))


def _write_adapter(target: safe_write.Directory, config: bytes, weights: bytes,
                   weights_name: str = SAFETENSORS_NAME, stale_name: str = PICKLE_NAME) -> None:
    """Replace the adapter files in ``target`` (flock held) in the order ``save_adapter``'s
    guarantees need: the new weights, and the new config if it differs from the current
    one, are staged (written and fsynced) first, so that the window without a config is
    three syscalls long; then a changing config is removed, so that no crash can pair the
    old config with the new weights; then the weights are renamed into place, then the
    config; then the directory is fsynced and a stale ``adapter_model.bin`` removed. Staged
    files that were not renamed are removed on error."""
    staged = {weights_name: safe_write.stage(target, weights_name, weights)}
    try:
        if safe_write.read_file(target, CONFIG_NAME) != config:
            staged[CONFIG_NAME] = safe_write.stage(target, CONFIG_NAME, config)
            safe_write.remove(target, CONFIG_NAME)
        for name, temp in list(staged.items()):  # the weights first, then the config
            safe_write.commit(target, temp, name)
            del staged[name]
        safe_write.sync(target)
    finally:
        for temp in staged.values():
            safe_write.remove(target, temp)
    safe_write.remove(target, stale_name)


def read_json(path: Path) -> object:
    """A config file's JSON value; ValueError for an unreadable or broken file."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable JSON file: {exc}") from exc
    except RecursionError:
        raise ValueError(f"{str(path)!r} nests JSON values too deeply to be an adapter config") from None


def _read_config(directory: Path) -> LoraConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}")
    return LoraConfig.from_dict(read_json(path))


def read_tensors(directory: Path, allow_pickle: bool, safetensors_name: str = SAFETENSORS_NAME,
                 pickle_name: str = PICKLE_NAME) -> dict[str, torch.Tensor]:
    """The weight file's tensors on the CPU: ``safetensors_name`` (``adapter_model.safetensors``),
    else ``pickle_name`` (``adapter_model.bin``) via ``torch.load(weights_only=True)`` when
    ``allow_pickle``."""
    path = directory / safetensors_name
    if path.is_file():
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as exc:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    path = directory / pickle_name
    if not path.is_file():
        raise FileNotFoundError(f"no {safetensors_name} (or {pickle_name}) in {str(directory)!r}")
    if not allow_pickle:
        raise ValueError(f"{str(path)!r} is a pickle file and is not loaded by default; pass allow_pickle=True to "
                         "load it with torch.load(weights_only=True), or convert it to safetensors")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} could not be loaded with torch.load(weights_only=True): {exc}") from exc
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(f"{str(path)!r} does not hold a dict of str -> tensor")
    return tensors


def read_lora_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA directory's ``(config, tensors)``: the tensors on the CPU under keys relative
    to the model (``_normalize_keys``), both from one save. What ``MultiAdapterModel`` loads.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: as ``load_adapter``.
    """
    directory = Path(directory)
    config = _read_config(directory)
    return config, _normalize_keys(read_tensors(directory, allow_pickle), str(directory))


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
        floating = dtype is None or dtype.is_floating_point
        if tensor.dtype.is_floating_point != floating or (not floating and tensor.dtype != dtype):
            raise ValueError(f"{source}: {key!r} has dtype {tensor.dtype}, expected "
                             f"{'a floating point dtype' if floating else dtype}")


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
    directory: str | os.PathLike,
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

    Everything (config, file, keys, shapes, dtypes) is checked and every tensor loaded into
    the new layers before the model is touched: on any error the model is unchanged.

    Raises:
        FileNotFoundError: ``directory`` does not exist, or has no config or weight file.
        NotADirectoryError: ``directory`` is a file, not a directory.
        ValueError: unreadable or corrupt files, a peft_type other than LORA or a feature
            fastpeft does not implement, missing / unexpected keys, wrong shapes or dtypes,
            a pickle without ``allow_pickle``, or a model that already has adapter layers.
    """
    require_module(model)
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"adapter path {str(directory)!r} is not a directory: an adapter is a directory "
                                 f"holding {CONFIG_NAME} and {SAFETENSORS_NAME}")
    if adapterhub_io.is_adapterhub_directory(directory):  # AdapterHub's bottleneck adapters
        return adapterhub_io.load_adapterhub(model, directory, is_trainable=is_trainable, allow_pickle=allow_pickle,
                                             autocast_adapter_dtype=autocast_adapter_dtype)
    prompt_data = prompt_io.read_config_data(directory)
    if prompt_data is not None:  # PROMPT_TUNING / PREFIX_TUNING (other prompt types are refused there)
        return prompt_io.load_prompt_adapter(model, directory, prompt_data,
                                             lambda d: read_tensors(d, allow_pickle), is_trainable=is_trainable)
    config = _read_config(directory)
    tensors = _normalize_keys(read_tensors(directory, allow_pickle), str(directory))
    check_not_adapted(model)
    plan = plan_injection(model, config)
    _check_tensors(model, plan, tensors, str(directory))
    with restore_requires_grad(model, always=False):
        replacements = build_replacements(
            model, plan, config, init_lora_weights=True, autocast_adapter_dtype=autocast_adapter_dtype
        )
        _fill(replacements, plan, tensors)
    install(model, config, replacements, plan.modules_to_save, trainable=is_trainable)
    return model
