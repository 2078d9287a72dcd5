"""What every adaptation method needs to know about the base layers it adapts, and the mark
of a layer that fastpeft put into a model.

* ``is_linear``: the base layers LoRA (and multi-LoRA) wrap: ``nn.Linear`` and transformers'
  ``Conv1D`` (weight ``[in, out]``, ``is_conv1d``);
* ``default_lora_dtype``: PEFT's adapter dtype rule (float32 adapters on a 16-bit base), which
  the bottleneck adapters follow too;
* ``AdapterLayer``: the base class of the layers a method installs (``ADAPTER_KIND`` names the
  method in messages), so that a model that already carries one is recognised whatever the
  method (``fastpeft.methods.state.check_not_adapted``).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn


class AdapterLayer(nn.Module):
    """Base class of the modules an adaptation method installs in a model."""

    ADAPTER_KIND = "adapter"


def default_lora_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's adapter dtype (its ``autocast_adapter_dtype=True``): float32 A and B on a
    float16 / bfloat16 base, the base's dtype otherwise."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` (GPT-2 style linear, weight ``[in, out]``), or None.

    Looked up in ``sys.modules`` rather than imported: no module can be a ``Conv1D`` unless
    transformers was imported, and fastpeft does not depend on transformers.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is a transformers ``Conv1D``."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer LoRA can wrap (``nn.Linear`` or ``Conv1D``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
