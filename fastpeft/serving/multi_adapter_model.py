"""``MultiAdapterModel``: one transformers model, many PEFT LoRA adapters, mixed batches.

The target linear layers are replaced once by ``MultiLoRALinear`` (preallocated slots);
``load_adapter`` copies a PEFT adapter directory into a free slot of every layer it targets
(and empties that slot elsewhere), ``unload_adapter`` empties it (once no running call uses
it, see Threads below). ``forward`` and
``generate`` take ``adapter_names`` (one per sequence, None = the base model), as PEFT's
mixed batches do, and every linear layer runs ``fastpeft.ops.multi_lora_linear`` with each
token's slot. Loading and unloading write only the slot concerned: nothing is reallocated,
other adapters' slots are untouched, and a compiled or captured model keeps working.

Files are read with ``fastpeft.formats.peft``'s readers (safetensors; a pickle only with
``allow_pickle=True`` and ``weights_only=True``) and configs with ``LoraConfig`` (PEFT's
rules: ``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``rank_pattern`` /
``alpha_pattern``, ``use_rslora``; DoRA adapters on a model made with ``dora=True``;
unsupported features raise). Everything is
checked before any slot is written: a failed load changes nothing.

Threads: a serving process may call ``forward`` / ``generate`` / ``load_adapter`` /
``unload_adapter`` from several threads at once.

* Each call gets its own adapters: the slot ids of a call are bound to the thread that makes
  it (``TokenAdapterIds.bind``) for the duration of the call, and the layers read the ids of
  the thread that runs them.
* Each call runs every sequence with the adapter its name had when the call started, whatever
  is loaded or unloaded meanwhile. A call counts itself as a user of its slots (under the
  model's lock, when it resolves its names); ``unload_adapter`` removes the name at once (later
  calls cannot use it) but the slot is emptied, and can be loaded again, only when its last
  user has finished: the one to leave empties it. ``load_adapter`` picks a free slot, writes
  it and publishes the name under the lock, so two loads never share a slot; when the only
  slots not loaded are still in use it waits for one to be freed. It reads and checks the
  files outside the lock; calls that start while it writes the slot wait for it.
* On CUDA the slot writes of ``load_adapter`` / the emptying are queued on the current stream
  of the thread that makes them: work queued on the same stream (the default, unless the
  threads choose streams) runs in order, so a slot is rewritten only after the kernels of
  the calls that read it. With streams of their own per thread that order is the caller's
  to ensure (synchronize the streams of finished calls before ``load_adapter`` /
  ``unload_adapter``).
* A copy (``copy.deepcopy``, pickling) has the adapters loaded when it starts and no running
  calls; one made while an adapter is being unloaded may hold part of that adapter.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from fastpeft.formats import peft as peft_format
from fastpeft.formats.safe_write import fs_path
from fastpeft.formats.saved_tensors import check_keys
from fastpeft.methods.base_layers import is_linear
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.layer import MAGNITUDE_KEY, adapter_shapes, lora_keys, lora_scaling
from fastpeft.methods.lora.multi_layer import MultiLoRALinear, TokenAdapterIds
from fastpeft.methods.lora.targets import is_excluded, is_targeted, pattern_value, plan_injection

# PEFT's name for "no adapter" in ``adapter_names``; fastpeft also takes None.
BASE_NAME = "__base__"


class MultiAdapterModel(nn.Module):
    """Wrap ``model`` (changed in place) for mixed-adapter batches.

    Args:
        model: a transformers model (or any ``nn.Module`` with ``nn.Linear`` / ``Conv1D``).
        max_adapters: adapter slots (adapters loaded at once).
        max_rank: largest LoRA rank an adapter may have.
        target_modules: the layers that get slots, with PEFT's matching rules
            (``"all-linear"``: every linear layer but the output embedding); an adapter may
            target any subset of them.
        dtype: of the slots; default PEFT's (float32 on a 16-bit model).
        dora: whether DoRA adapters (``use_dora=True``) may be loaded: each layer then keeps a
            per-slot output scale (``MultiLoRALinear``'s ``dora``), applied on every forward, so
            LoRA and DoRA adapters mix in one batch (inference: PEFT's DoRA formula, the scale
            computed once at load). Off by default: the scale pass costs LoRA-only serving an
            extra M x N multiply per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_adapters: int = 8,
        max_rank: int = 64,
        target_modules: str | Sequence[str] = "all-linear",
        dtype: torch.dtype | None = None,
        dora: bool = False,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():  # PEFT's fan_in_fan_out notes concern adapters, not slots
            warnings.simplefilter("ignore")
            targets = plan_injection(model, LoraConfig(r=1, target_modules=target_modules)).targets
            all_linear = plan_injection(model, LoraConfig(r=1, target_modules="all-linear")).targets
        self._linear_paths = frozenset(name for name, module in model.named_modules() if name and is_linear(module))
        self._all_linear = frozenset(t.name for t in all_linear)
        self.token_ids = TokenAdapterIds()
        self.layers: dict[str, MultiLoRALinear] = {}
        for t in targets:
            layer = MultiLoRALinear(t.module, max_adapters, max_rank, dtype=dtype, token_ids=self.token_ids, dora=dora)
            model.set_submodule(t.name, layer)
            self.layers[t.name] = layer
        self.model = model
        self.max_adapters, self.max_rank, self.dora = max_adapters, max_rank, bool(dora)
        # Under _slots_changed (a Condition, notified when a slot becomes free): the loaded
        # adapters (name -> slot) and the number of running calls using each slot.
        self._slots_changed = threading.Condition()
        self._loaded: dict[str, int] = {}
        self._users = [0] * max_adapters

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` and pickling: the model and its loaded adapters, without the
        lock (which can be neither) or the running calls (a copy has none)."""
        with self._slots_changed:
            state = super().__getstate__()
            state["_loaded"] = dict(self._loaded)
        del state["_slots_changed"]
        state["_users"] = [0] * self.max_adapters
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._slots_changed = threading.Condition()
        for slot in set(range(self.max_adapters)) - set(self._loaded.values()):
            self._clear_slot(slot)  # one the original was emptying or loading while it was copied

    @property
    def adapters(self) -> dict[str, int]:
        """The loaded adapters, ``{name: slot}`` (a copy)."""
        with self._slots_changed:
            return dict(self._loaded)

    # ----------------------------------------------------------------------- adapters
    def _adapter_targets(self, config: LoraConfig, source: str) -> dict[str, tuple[int, float]]:
        """``{layer path: (r, alpha)}`` the adapter's config selects, by PEFT's rules."""
        target_modules = tuple(self._all_linear) if config.is_all_linear else config.target_modules
        if target_modules is None:
            raise ValueError(f"{source}: the adapter config has no target_modules")
        if config.modules_to_save:
            raise ValueError(f"{source}: modules_to_save {list(config.modules_to_save)} (full copies of modules per "
                             "adapter) is not supported by MultiAdapterModel")
        if config.use_dora and not self.dora:
            raise ValueError(f"{source} is a DoRA adapter (use_dora=True): create the MultiAdapterModel with "
                             "dora=True to serve DoRA adapters")
        found: dict[str, tuple[int, float]] = {}
        for key, _ in self.model.named_modules():
            if not key or not is_targeted(config, target_modules, key) or is_excluded(config, key):
                continue
            if key not in self.layers:
                why = ("has no adapter slots: add it to MultiAdapterModel's target_modules"
                       if key in self._linear_paths else "is not a linear layer")
                raise ValueError(f"{source} targets {key!r}, which {why}")
            r = pattern_value(config.rank_pattern, key, config.r)
            found[key] = (r, pattern_value(config.alpha_pattern, key, config.lora_alpha))
        if not found:
            raise ValueError(f"{source}: target_modules={config.target_modules!r} matches no layer of the model")
        return found

    def _check_weights(self, targets: dict[str, tuple[int, float]], tensors: dict[str, torch.Tensor],
                       source: str, use_dora: bool) -> None:
        """The file holds exactly each target's A and B (and DoRA magnitude), floating point,
        of the target's shapes, with ranks up to ``max_rank``."""
        expected = {f"{path}.{key}": shape for path, (r, _) in targets.items()
                    for key, shape in adapter_shapes(self.layers[path].in_features, self.layers[path].out_features, r,
                                                     use_dora).items()}
        check_keys(expected, tensors, f"{source} does not match its config on this model")
        for path, (r, _) in targets.items():
            if r > self.max_rank:
                raise ValueError(f"{source}: {path!r} has rank {r} > max_rank {self.max_rank}")
        for key, shape in expected.items():
            tensor = tensors[key]
            if not tensor.dtype.is_floating_point:
                raise ValueError(f"{source}: {key!r} has dtype {tensor.dtype}, expected a floating point dtype")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {shape} (the config's "
                                 "rank and the model's layer)")

    def load_adapter(self, name: str, directory: str | bytes | os.PathLike, *, allow_pickle: bool = False) -> int:
        """Load the PEFT LoRA (or, with ``dora``, DoRA) adapter in ``directory`` as ``name`` into a
        free slot; return the slot.

        Safe against running calls and other loads (see the module docstring): a slot that a
        running call still uses after its adapter was unloaded is not free; when no other slot
        is, this waits until one is.

        Raises:
            TypeError: ``name`` is not a non-empty str.
            ValueError: ``name`` already loaded, every slot holding a loaded adapter, or the
                adapter is invalid (unreadable files, a rank above ``max_rank``, a target without
                slots, missing or extra weights, an unsupported feature); nothing is changed then.
            FileNotFoundError / NotADirectoryError / TypeError (``directory`` not a path): as
                ``fastpeft.load_adapter``, which reads the files the same way (one save, regular
                files, capped).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
        if name == BASE_NAME:
            raise ValueError(f"{BASE_NAME!r} names the base model in adapter_names; choose another adapter name")
        source = fs_path(directory)
        config, tensors = peft_format.read_lora_adapter(source, allow_pickle)
        targets = self._adapter_targets(config, source)
        self._check_weights(targets, tensors, source, config.use_dora)
        with self._slots_changed:
            while (slot := self._free_slot(name)) is None:
                self._slots_changed.wait()
            for path, layer in self.layers.items():
                if path in targets:
                    r, alpha = targets[path]
                    lora_a, lora_b = (tensors[key] for key in lora_keys(path))
                    magnitude = tensors[f"{path}.{MAGNITUDE_KEY}"] if config.use_dora else None
                    layer.load_slot(slot, lora_a, lora_b, lora_scaling(r, alpha, config.use_rslora), magnitude)
                else:
                    layer.clear_slot(slot)  # a layer this adapter does not target contributes nothing
            self._loaded[name] = slot
        return slot

    def _free_slot(self, name: str) -> int | None:
        """Under the lock: a slot for ``name`` that is neither loaded nor used by a running
        call, or None while the only slots not loaded are still in use.

        Raises:
            ValueError: ``name`` is already loaded, or every slot holds a loaded adapter.
        """
        if name in self._loaded:
            raise ValueError(f"adapter {name!r} is already loaded (slot {self._loaded[name]}); unload it first")
        not_loaded = [s for s in range(self.max_adapters) if s not in self._loaded.values()]
        if not not_loaded:
            raise ValueError(f"all {self.max_adapters} adapter slots are in use ({sorted(self._loaded)}); unload one "
                             "first or create the MultiAdapterModel with a larger max_adapters")
        return next((s for s in not_loaded if not self._users[s]), None)

    def unload_adapter(self, name: str) -> None:
        """Remove ``name``: later calls cannot use it; its slot is emptied in every layer (other
        slots untouched) at once, or when the last running call using it finishes. Raises
        KeyError if ``name`` is not loaded."""
        with self._slots_changed:
            if name not in self._loaded:
                raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self._loaded)}")
            slot = self._loaded.pop(name)
            if not self._users[slot]:
                self._clear_slot(slot)
                self._slots_changed.notify_all()

    def _clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)

    # ----------------------------------------------------------------------- batches
    @contextlib.contextmanager
    def _batch(self, adapter_names: Sequence[str | None] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        """Run the block with ``adapter_names``' slot ids bound to this thread, and their slots
        in use (not emptied or reused) until it ends."""
        if adapter_names is None:
            with self.token_ids.bind(None):
                yield
            return
        if getattr(self.model, "is_gradient_checkpointing", False) and self.model.training and torch.is_grad_enabled():
            raise ValueError("MultiAdapterModel: the wrapped model has gradient checkpointing on, whose recompute in "
                             "the backward runs after this call, without its adapter_names (the gradients would be "
                             "the base model's); call model.gradient_checkpointing_disable() or run it in eval mode")
        slots = self._acquire(self._checked_names(adapter_names, args, kwargs))
        try:
            device = next(iter(self.layers.values())).ranks.device
            with self.token_ids.bind(torch.tensor(slots, dtype=torch.int64, device=device)):
                yield
        finally:
            self._release(slots)

    @staticmethod
    def _checked_names(adapter_names: Sequence[str | None], args: tuple, kwargs: dict) -> list[str | None]:
        """``adapter_names`` with PEFT's ``"__base__"`` as None, after checking its type and that
        it has one entry per sequence of the batch (``input_ids`` / ``inputs_embeds``)."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list with one adapter name (or None) per sequence, "
                            f"got {adapter_names!r}")
        odd = [n for n in adapter_names if n is not None and not isinstance(n, str)]
        if odd:
            raise TypeError(f"adapter_names must hold adapter names (str) or None, got {odd[:4]}")
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {inputs.shape[0]} "
                             "sequences: give one adapter name (or None) per sequence")
        return [None if n == BASE_NAME else n for n in adapter_names]

    def _acquire(self, names: list[str | None]) -> list[int]:
        """The slot of each name (-1: the base), each counted as used by one more sequence."""
        with self._slots_changed:
            unknown = sorted({n for n in names if n is not None and n not in self._loaded})
            if unknown:
                raise ValueError(f"adapter_names has adapters that are not loaded: {unknown}; "
                                 f"loaded: {sorted(self._loaded)}")
            slots = [-1 if n is None else self._loaded[n] for n in names]
            for slot in slots:
                if slot >= 0:
                    self._users[slot] += 1
        return slots

    def _release(self, slots: list[int]) -> None:
        """Undo ``_acquire``; a slot unloaded meanwhile is emptied when its last user leaves."""
        with self._slots_changed:
            for slot in slots:
                if slot >= 0:
                    self._users[slot] -= 1
                    if not self._users[slot] and slot not in self._loaded.values():
                        self._clear_slot(slot)
                        self._slots_changed.notify_all()

    def forward(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward with sequence b run with adapter ``adapter_names[b]``
        (None or PEFT's ``"__base__"``: the base model; ``adapter_names=None``: every sequence on the base)."""
        with self._batch(adapter_names, args, kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``, every step (prefill and each KV-cache decode step)
        run with sequence b's adapter ``adapter_names[b]``."""
        with self._batch(adapter_names, args, kwargs):
            return self.model.generate(*args, **kwargs)
