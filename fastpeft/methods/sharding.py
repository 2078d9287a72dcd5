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

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn as nn


# (DTensor, FSDPModule) once torch.distributed.tensor and torch.distributed.fsdp are both
# imported (classes never change after that): the lookups cost more than the checks, per forward.
_classes: tuple[type, type] | None = None


def _sharding_classes() -> tuple[type | None, type | None]:
    """``(DTensor, FSDPModule)``, each None while its module is not imported."""
    global _classes
    if _classes is not None:
        return _classes
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if dtensor is not None and fsdp is not None:
        _classes = (dtensor, fsdp)
    return dtensor, fsdp


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter FSDP2 sharded, or a tensor-parallel one)."""
    dtensor = _sharding_classes()[0]
    return dtensor is not None and isinstance(t, dtensor)


def is_fsdp_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself (it is an ``FSDPModule``)."""
    fsdp = _sharding_classes()[1]
    return fsdp is not None and isinstance(module, fsdp)


def sharded_apart(*modules: nn.Module) -> bool:
    """Whether any of a layer's adapter submodules must be called to see its weights whole:
    it is an FSDP unit of its own, or holds ``DTensor`` parameters at this point (sharded by
    FSDP2 or tensor parallelism outside the layer's own unit). Called at every forward
    (about a microsecond on a CPU)."""
    dtensor, fsdp = _sharding_classes()
    if dtensor is None:  # FSDP2 imports it: nothing is sharded
        return False
    for module in modules:
        if fsdp is not None and isinstance(module, fsdp):
            return True
        for p in module._parameters.values():
            if issubclass(type(p), dtensor):  # isinstance goes through the tensor metaclass: 10x slower
                return True
    return False


@contextlib.contextmanager
def gathered(*modules: nn.Module) -> Iterator[None]:
    """The block with the FSDP units among ``modules`` unsharded (``FSDPModule.unshard``: their
    parameters whole, plain tensors), resharded after it, whatever happens: for reading a
    unit's weights outside its forward (no gradient reaches them through such reads; FSDP2
    gathers them again around the unit's own forward)."""
    units = [m for m in modules if is_fsdp_unit(m)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def sharded_mesh(model: nn.Module):
    """The device mesh of the model's sharded parameters (FSDP2's ``DTensor`` s), or None."""
    return next((p.device_mesh for p in model.parameters() if is_sharded(p)), None)


def shard_new_modules(model: nn.Module, old_parameters: set[int]) -> None:
    """``fully_shard`` every module of ``model`` holding, directly, a parameter whose id is not
    in ``old_parameters`` -- an adapter just added to a model sharded with FSDP2 -- on the mesh
    of its sharded parameters, innermost first (FSDP2 shards children before parents). Each
    becomes an FSDP unit of its own, which the fastpeft layers call (``sharded_apart``). Only
    before the model's first forward: FSDP2 collects its units at the root's first forward."""
    from torch.distributed.fsdp import fully_shard  # public from torch 2.6, fastpeft's floor

    mesh = sharded_mesh(model)
    for module in reversed(list(model.modules())):
        if any(id(p) not in old_parameters for p in module._parameters.values() if p is not None):
            fully_shard(module, mesh=mesh)
