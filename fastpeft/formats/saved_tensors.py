"""Tensors as the adapter savers hand them to safetensors (PEFT, AdapterHub and prompt files,
and fastpeft's own encoder file): detached, on the CPU, contiguous, sharing no storage with the
model (safetensors refuses shared or strided storage); and the dtype rule every loader
applies to the tensors it reads (``check_tensors``: ``check_keys``, shapes, ``check_dtype``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fastpeft.methods.sharding import is_sharded

# Keys a key mismatch names of each kind (missing, unexpected): enough to see the pattern.
_KEYS_SHOWN = 8


def sharded_group(model: torch.nn.Module):
    """The process group of ``model``'s sharded parameters (FSDP2's ``DTensor`` s), or None
    when none is sharded."""
    for param in model.parameters():
        if is_sharded(param):
            return param.device_mesh.get_group()
    return None


def module_tensors(model: torch.nn.Module, paths: Iterable[str]) -> list[torch.Tensor]:
    """The state-dict tensors (parameters and persistent buffers, themselves) of the model's
    submodules at ``paths`` (a ``modules_to_save`` list)."""
    return [t for path in paths for t in model.get_submodule(path).state_dict(keep_vars=True).values()]


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy of ``t``; a ``DTensor`` is gathered whole first
    (``full_tensor``: a collective, so every rank of its mesh must make the same calls in the
    same order, as every rank's ``save_adapter`` of the same model does)."""
    if is_sharded(t):
        t = t.detach().full_tensor()
    return t.detach().to("cpu", copy=True).contiguous()


def cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cpu_copy`` of every value, keys and order kept."""
    return {key: cpu_copy(value) for key, value in tensors.items()}


def check_dtype(tensor: torch.Tensor, expected: torch.dtype | None, key: str, source: str) -> None:
    """A loaded tensor's dtype rule: where the adapter holds floating point (``expected``
    None or a floating dtype: LoRA / adapter weights, prompts) any floating dtype is taken
    and cast, as PEFT does; an integer or bool tensor there would be cast silently, so it
    is refused. A non-floating ``expected`` (an integer buffer of a ``modules_to_save``
    module) must match exactly.

    Raises:
        ValueError: naming ``source`` (the file), ``key``, the dtype and what was expected.
    """
    floating = expected is None or expected.is_floating_point
    if tensor.dtype.is_floating_point != floating or (not floating and tensor.dtype != expected):
        raise ValueError(f"{source}: {key!r} has dtype {tensor.dtype}, expected "
                         f"{'a floating point dtype' if floating else expected}")


def check_keys(expected: Iterable[str], found: Iterable[str], message: str) -> None:
    """A loaded file must hold exactly the ``expected`` keys.

    Raises:
        ValueError: ``"<message>: missing keys [...], unexpected keys [...]"`` (the first
            ``_KEYS_SHOWN`` of each, sorted) when the key sets differ.
    """
    expected, found = set(expected), set(found)
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise ValueError(f"{message}: missing keys {shown_keys(missing)}, unexpected keys {shown_keys(extra)}")


def shown_keys(keys: list[str]) -> str:
    """The first ``_KEYS_SHOWN`` of ``keys``, and `` ...`` when there are more."""
    return f"{keys[:_KEYS_SHOWN]}{' ...' if len(keys) > _KEYS_SHOWN else ''}"


def check_tensors(expected: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]],
                  tensors: Mapping[str, torch.Tensor], source: str, what: str, shapes_from: str) -> None:
    """A loaded file (``source``) must hold exactly ``expected``'s keys (``check_keys``:
    "does not match ``what``"), each tensor with its shape and its dtype rule
    (``check_dtype``); ``shapes_from`` says where the expected shapes come from.

    Raises:
        ValueError: naming the file, the key, what it has and what was expected.
    """
    check_keys(expected, tensors, f"{source} does not match {what}")
    for key, (shape, dtype) in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"(from {shapes_from})")
        check_dtype(tensor, dtype, key, source)
