"""Where bottleneck adapters go in a transformers model, and the hooks that run them there,
exactly as AdapterHub (``adapters`` 1.3.0) places them.

AdapterHub runs a sublayer's output ``h`` and its residual stream ``r`` through
``bottleneck_layer_forward(h, r, layer_norm)`` in place of the model's own residual add:
``layer_norm(h + r)`` in a post-LN block (BERT: ``BertSelfOutput`` / ``BertOutput``, after
their dropout) and ``h + r`` in a pre-LN block (Llama, GPT-2: the attention and MLP outputs,
with ``layer_norm=None``). With ``original_ln_after`` (the only setting fastpeft implements)
that function ends with the model's own add, so fastpeft keeps the model's code and changes
only ``h``: a forward hook on the module producing ``h`` returns ``h'`` with

* sequential (``is_parallel=False``): ``x = LN(h + r)`` (``h + r`` without a LayerNorm) with
  ``original_ln_before``, else ``x = h``; ``h' = res + scaling * f(x)`` where ``res`` is
  ``h`` (``residual_before_ln=True``), ``x`` (False) or ``h + r`` (``"post_add"``, which needs
  ``original_ln_before`` and a post-LN block: AdapterHub fails on it otherwise);
* parallel: ``h' = h + scaling * f(r)``;

and the model then computes ``LN(h' + r)`` or ``h' + r``, which is AdapterHub's output. ``r``
is taken by a forward pre-hook on the module that receives it (``BertSelfOutput``'s
``input_tensor``; the pre-LayerNorm of a pre-LN block) and handed to the output hook of the
same call, per thread: one model may run forwards in several threads at once.

Each adapter module is registered on the model (``owner.child``, see ``SiteSpec``), so it is
in ``model.parameters()`` / ``state_dict()`` and follows ``.to()``. Layouts are known per
``config.model_type`` (``ARCHITECTURES``); every check runs in ``plan_bottleneck`` before
anything is changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastpeft.methods.base_layers import default_lora_dtype
from fastpeft.methods.bottleneck.config import POST_ADD, AdapterConfig
from fastpeft.methods.bottleneck.layer import BottleneckAdapter, bottleneck_size_for

MH_ADAPTER = "mh_adapter"
OUTPUT_ADAPTER = "output_adapter"


@dataclass(frozen=True)
class SiteSpec:
    """One adapter position of a layer; paths are relative to the layer.

    Attributes:
        location: AdapterHub's location key, ``"mh_adapter"`` or ``"output_adapter"``.
        residual_module: the module called with the residual stream ``r``, as positional
            argument ``residual_arg`` or keyword ``residual_kwarg``.
        output_module: the module whose output (its first element, for a tuple) is ``h``.
        layer_norm: the post-LN applied to ``h + r`` (post-LN blocks), or None.
        owner, child: the adapter is registered as ``owner.child`` (``owner`` "" = the layer).
        hub_prefix: the path of AdapterHub's ``adapters`` ModuleDict for this position.
        optional: the position exists only in some layers (BERT's cross-attention).
    """

    location: str
    residual_module: str
    residual_arg: int
    residual_kwarg: str
    output_module: str
    layer_norm: str | None
    owner: str
    child: str
    hub_prefix: str
    optional: bool = False


def _post_ln_site(location: str, block: str, optional: bool = False) -> SiteSpec:
    """A BERT-style ``*Output`` module ``block``: ``LayerNorm(dropout(dense(x)) + input_tensor)``."""
    return SiteSpec(location, block, 1, "input_tensor", f"{block}.dropout", f"{block}.LayerNorm",
                    block, "bottleneck_adapter", f"{block}.adapters", optional)


def _pre_ln_site(location: str, norm: str, arg: str, sublayer: str, prefix: str) -> SiteSpec:
    """A pre-LN block's ``r + sublayer(norm(r))``: ``r`` enters ``norm``, ``h`` leaves ``sublayer``."""
    return SiteSpec(location, norm, 0, arg, sublayer, None, "", f"{prefix}_bottleneck_adapter",
                    f"{prefix}_adapters.adapters")


@dataclass(frozen=True)
class Architecture:
    """A layer layout: the path suffix of the layer list and the adapter positions per layer."""

    family: str
    layers: str
    sites: tuple[SiteSpec, ...]


_BERT = Architecture("BERT (post-LN)", "encoder.layer", (
    _post_ln_site(MH_ADAPTER, "attention.output"),
    # AdapterHub's BertSelfOutput mixin serves the decoder's cross-attention output too.
    _post_ln_site(MH_ADAPTER, "crossattention.output", optional=True),
    _post_ln_site(OUTPUT_ADAPTER, "output"),
))
_LLAMA = Architecture("Llama (pre-LN)", "layers", (
    _pre_ln_site(MH_ADAPTER, "input_layernorm", "hidden_states", "self_attn", "attention"),
    _pre_ln_site(OUTPUT_ADAPTER, "post_attention_layernorm", "hidden_states", "mlp", "output"),
))
_GPT2 = Architecture("GPT-2 (pre-LN)", "h", (
    _pre_ln_site(MH_ADAPTER, "ln_1", "input", "attn", "attention"),
    _pre_ln_site(OUTPUT_ADAPTER, "ln_2", "input", "mlp", "output"),
))
# config.model_type -> layout; the model types AdapterHub adapts with these layouts.
ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
    "llama": _LLAMA, "mistral": _LLAMA,
    "gpt2": _GPT2,
}


@dataclass(frozen=True)
class PlannedSite:
    """A checked adapter position of one layer of a model."""

    layer_index: int
    layer_path: str
    spec: SiteSpec
    hidden_size: int
    bottleneck_size: int

    def path(self, relative: str) -> str:
        return ".".join(p for p in (self.layer_path, relative) if p)

    @property
    def adapter_path(self) -> str:
        """Where the adapter module is registered in the model."""
        return self.path(f"{self.spec.owner}.{self.spec.child}" if self.spec.owner else self.spec.child)

    def hub_prefix(self, adapter_name: str) -> str:
        """AdapterHub's state-dict prefix of this adapter (ends with a dot)."""
        return f"{self.path(self.spec.hub_prefix)}.{adapter_name}."


def architecture_of(model: nn.Module) -> Architecture:
    """The layout for ``model.config.model_type``. Raises ValueError for other models."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"fastpeft places bottleneck adapters in transformers models of type "
                         f"{sorted(ARCHITECTURES)} (as AdapterHub does), got {type(model).__name__} with "
                         f"config.model_type {model_type!r}")
    return ARCHITECTURES[model_type]


def _layer_list(model: nn.Module, arch: Architecture) -> tuple[str, nn.ModuleList]:
    suffix = arch.layers
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and (name == suffix or name.endswith("." + suffix))]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: expected one {arch.family} layer list named '{suffix}', "
                         f"found {[name for name, _ in found]}")
    return found[0]


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def plan_bottleneck(model: nn.Module, config: AdapterConfig) -> list[PlannedSite]:
    """The adapter positions ``config`` asks for in ``model``, checked; nothing is changed.

    Raises:
        ValueError: a model type fastpeft has no layout for, a layer without the modules the
            layout names, ``residual_before_ln="post_add"`` in a pre-LN model, a
            ``reduction_factor`` mapping without the layer's entry, or a position that already
            holds an adapter.
    """
    arch = architecture_of(model)
    hidden_size = getattr(model.config, "hidden_size", None)
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"{type(model).__name__}.config.hidden_size must be an int >= 1, got {hidden_size!r}")
    list_path, layers = _layer_list(model, arch)
    wanted = {MH_ADAPTER: config.mh_adapter, OUTPUT_ADAPTER: config.output_adapter}
    plan = []
    for index, layer in enumerate(layers):
        if index in config.leave_out:
            continue
        for spec in arch.sites:
            if not wanted[spec.location]:
                continue
            if spec.optional and not _has(layer, spec.owner):
                continue
            layer_path = f"{list_path}.{index}"
            for path in filter(None, (spec.residual_module, spec.output_module, spec.layer_norm, spec.owner)):
                if not _has(layer, path):
                    raise ValueError(f"{layer_path} has no module {path!r}, which the {arch.family} layout "
                                     f"needs for the {spec.location} position")
            owner = layer.get_submodule(spec.owner) if spec.owner else layer
            if hasattr(owner, spec.child):
                raise ValueError(f"{layer_path}: {spec.owner or 'the layer'} already has a {spec.child!r}; "
                                 "remove the bottleneck adapter with fastpeft.unload(model) first")
            if config.residual_before_ln == POST_ADD and not config.is_parallel and spec.layer_norm is None:
                raise ValueError(f"AdapterConfig.residual_before_ln='post_add' needs the block's own LayerNorm "
                                 f"after the residual add; {arch.family} blocks have none (AdapterHub fails on it too)")
            size = bottleneck_size_for(hidden_size, config.reduction_factor_for(index))
            plan.append(PlannedSite(index, layer_path, spec, hidden_size, size))
    if not plan:
        raise ValueError(f"AdapterConfig places no adapter in {type(model).__name__}: every one of its "
                         f"{len(layers)} layers is in leave_out {list(config.leave_out)}")
    return plan


class BottleneckSite:
    """The hooks of one placed adapter (see the module docstring for the math).

    ``remember_residual`` (a forward pre-hook with kwargs on ``residual_module``) keeps ``r``
    until ``adapt_output`` (a forward hook on ``output_module``) of the same layer call
    replaces ``h`` by ``h'`` and lets go of it. Hooks are registered by ``attach`` and removed
    by ``detach``; the handles survive ``copy.deepcopy`` and pickling of the model, bound to
    the copy.

    Thread safety: ``r`` is kept per thread (a ``threading.local``), so forwards of one model
    running in several threads at once each pair their own ``r`` and ``h`` (a layer call runs
    both hooks in the thread that calls it; so does a gradient-checkpointing recompute). A
    copy starts with no residual kept.
    """

    def __init__(self, planned: PlannedSite, adapter: BottleneckAdapter, layer_norm: nn.Module | None,
                 config: AdapterConfig) -> None:
        self.planned = planned
        self.adapter = adapter
        self.layer_norm = layer_norm
        self.parallel = config.is_parallel
        self.ln_before = config.original_ln_before
        self.residual_before_ln = config.residual_before_ln
        self._kept = threading.local()  # .residual: this thread's r, from pre-hook to hook
        self._handles: tuple = ()

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` and pickling: everything but the per-thread residuals (a
        ``threading.local`` can be neither copied nor pickled, and they belong to running calls)."""
        state = self.__dict__.copy()
        del state["_kept"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._kept = threading.local()

    def attach(self, layer: nn.Module) -> None:
        spec = self.planned.spec
        self._handles = (
            layer.get_submodule(spec.residual_module).register_forward_pre_hook(self.remember_residual, with_kwargs=True),
            layer.get_submodule(spec.output_module).register_forward_hook(self.adapt_output),
        )

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = ()
        self._kept = threading.local()

    def remember_residual(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        spec = self.planned.spec
        if len(args) > spec.residual_arg:
            self._kept.residual = args[spec.residual_arg]
        elif spec.residual_kwarg in kwargs:
            self._kept.residual = kwargs[spec.residual_kwarg]
        else:
            raise RuntimeError(f"bottleneck adapter at {self.planned.adapter_path}: "
                               f"{self.planned.path(spec.residual_module)} was called without its argument "
                               f"{spec.residual_arg} ({spec.residual_kwarg!r}), the residual stream")

    def adapt_output(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        residual = getattr(self._kept, "residual", None)
        self._kept.residual = None
        if residual is None:
            raise RuntimeError(f"bottleneck adapter at {self.planned.adapter_path}: "
                               f"{self.planned.path(self.planned.spec.output_module)} ran outside its layer's "
                               "forward, so the residual stream the adapter needs is unknown")
        if isinstance(output, tuple):
            return (self.sublayer_output(output[0], residual),) + output[1:]
        return self.sublayer_output(output, residual)

    def sublayer_output(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``h'``: what the sublayer returns instead of ``h`` so that the model's own
        ``LN(h' + r)`` / ``h' + r`` is AdapterHub's output."""
        if self.parallel:
            return self.adapter(r, residual=h)
        if not self.ln_before:
            return self.adapter(h)
        pre = h + r
        x = self.layer_norm(pre) if self.layer_norm is not None else pre
        residual = {True: h, False: x, POST_ADD: pre}[self.residual_before_ln]
        return self.adapter(x, residual=residual)


@dataclass(frozen=True)
class BottleneckPlacement:
    """A model's placed bottleneck adapter: its AdapterHub name and its sites, in model order."""

    name: str
    sites: tuple[BottleneckSite, ...]

    def adapters(self) -> list[tuple[str, BottleneckAdapter]]:
        """``(path in the model, module)`` of every adapter."""
        return [(site.planned.adapter_path, site.adapter) for site in self.sites]


def _site_dtype(layer: nn.Module, autocast_adapter_dtype: bool) -> tuple[torch.device, torch.dtype]:
    """The device and adapter dtype for a layer: its first floating parameter's device, and
    that parameter's dtype, or float32 on a float16 / bfloat16 layer with
    ``autocast_adapter_dtype`` (as for LoRA)."""
    param = next((p for p in layer.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, default_lora_dtype(param.dtype) if autocast_adapter_dtype else param.dtype


def build_adapters(model: nn.Module, plan: list[PlannedSite], config: AdapterConfig,
                   autocast_adapter_dtype: bool) -> list[BottleneckAdapter]:
    """New adapter modules for the plan (not yet installed), initialized as ``config`` says:
    made on the CPU (so a seed gives AdapterHub's numbers), then moved to the layer's device."""
    out = []
    for site in plan:
        layer = model.get_submodule(site.layer_path)
        device, dtype = _site_dtype(layer, autocast_adapter_dtype)
        adapter = BottleneckAdapter(
            site.hidden_size, site.bottleneck_size, non_linearity=config.non_linearity, scaling=config.scaling,
            dropout=config.dropout, init=config.init_weights, dtype=dtype,
        )
        if config.init_weights_seed:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.init_weights_seed)
                adapter.reset_parameters(config.init_weights)
        out.append(adapter.to(device).train(layer.training))
    return out


def install(model: nn.Module, name: str, plan: list[PlannedSite], adapters: list[BottleneckAdapter],
            config: AdapterConfig) -> BottleneckPlacement:
    """Register each adapter on its owner module and attach its hooks. Cannot fail on a
    checked plan."""
    sites = []
    for planned, adapter in zip(plan, adapters, strict=True):
        layer = model.get_submodule(planned.layer_path)
        spec = planned.spec
        owner = layer.get_submodule(spec.owner) if spec.owner else layer
        owner.register_module(spec.child, adapter)
        norm = layer.get_submodule(spec.layer_norm) if spec.layer_norm else None
        site = BottleneckSite(planned, adapter, norm, config)
        site.attach(layer)
        sites.append(site)
    return BottleneckPlacement(name, tuple(sites))


def remove(model: nn.Module, placement: BottleneckPlacement) -> None:
    """Detach every site's hooks and unregister its adapter module."""
    for site in placement.sites:
        site.detach()
        spec = site.planned.spec
        layer = model.get_submodule(site.planned.layer_path)
        owner = layer.get_submodule(spec.owner) if spec.owner else layer
        delattr(owner, spec.child)

