"""PEFT's ``modules_to_save`` rule, shared by the methods that take it (LoRA, prompt learning):
which modules of a model are replaced by trainable copies."""

from __future__ import annotations

import torch.nn as nn


def find_modules_to_save(model: nn.Module, names: tuple[str, ...] | None, field: str) -> tuple[str, ...]:
    """Paths of the ``modules_to_save`` modules: those ending with one of ``names`` (PEFT's
    ``_set_trainable`` rule), outermost only (a match inside another is part of its copy).

    Raises:
        ValueError: ``names`` is not empty and none matches (naming ``field``, the config field).
    """
    if not names:
        return ()
    found: list[str] = []
    for key, _ in model.named_modules(remove_duplicate=False):
        if key and key.endswith(tuple(names)) and not any(key.startswith(f"{outer}.") for outer in found):
            found.append(key)
    if not found:
        raise ValueError(f"{field} {list(names)} matches no module of the model")
    return tuple(found)
