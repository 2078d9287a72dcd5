"""What a fastpeft layer needs to know about parameters sharded by ``torch.distributed``.

FSDP2 (``fully_shard``) turns a module's parameters into ``DTensor`` shards and all-gathers
them only around that module's own ``forward`` (its pre-forward hook unshards them; the hooks
on the outputs gather them again for the backward and reduce-scatter their gradients). A
fused op that reads a submodule's weights without calling its forward would get the shards:
so a layer whose adapter submodules are FSDP units of their own (``fully_shard(layer.lora_A)``)
computes its adapter through their forwards instead (``sharded_apart``), and the fused op only
runs where the weights are plain tensors (a unit around the whole layer, or none).

The torch.distributed classes are looked up in ``sys.modules``: no tensor or module can be
one unless its module was imported, and importing them (sympy and the rest) on every forward
or save would cost seconds.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

# Where FSDP2's module class lives: public from torch 2.6, the private path before it.
_FSDP_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter FSDP2 sharded, or a tensor-parallel one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_fsdp_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself (it is an ``FSDPModule``)."""
    for name in _FSDP_MODULES:
        cls = getattr(sys.modules.get(name), "FSDPModule", None)
        if cls is not None and isinstance(module, cls):
            return True
    return False


def sharded_apart(*modules: nn.Module) -> bool:
    """Whether any of a layer's adapter submodules must be called to see its weights whole:
    it is an FSDP unit of its own, or holds ``DTensor`` parameters at this point (sharded by
    FSDP2 or tensor parallelism outside the layer's own unit)."""
    if "torch.distributed.tensor" not in sys.modules:  # FSDP2 imports it: nothing is sharded (the usual, fast case)
        return False
    return any(is_fsdp_unit(m) or any(is_sharded(p) for p in m.parameters(recurse=False)) for m in modules)
