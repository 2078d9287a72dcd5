"""``LoRALinear``: a drop-in ``nn.Linear`` (or transformers ``Conv1D``) with a LoRA adapter,
run by the fused op.

Parameters are named and shaped as HF PEFT's ``lora.Linear`` (``weight``, ``bias``,
``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``) so state-dict keys line up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.methods.base_layers import (
    LINEAR,
    AdapterLayer,
    BaseLayerKind,
    default_lora_dtype,
    is_conv1d,
    require_base_layer,
)
from fastpeft.methods.quantized_base import QuantizedBaseState, add_to_quantized
from fastpeft.methods.sharding import is_sharded, sharded_apart
from fastpeft.ops.checks import require_finite, require_probability
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.ops.qlora_linear import qlora_linear


def _require_rank(r: object) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int >= 1, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    return r


# The submodules holding A and B, named as PEFT's lora.Linear names them, and the keys of their
# weights under a layer's path in a state dict (PEFT's saved keys, less its prefix and the
# adapter name): declared here once for every reader and writer of LoRA tensors.
A_MODULE, B_MODULE = "lora_A", "lora_B"
A_KEY, B_KEY = f"{A_MODULE}.weight", f"{B_MODULE}.weight"
# DoRA's magnitude: PEFT's saved key (in memory PEFT holds lora_magnitude_vector.<adapter>.weight),
# and the DoRA layer's parameter.
MAGNITUDE_KEY = "lora_magnitude_vector"


def lora_keys(path: str) -> tuple[str, str]:
    """``(A's key, B's key)`` of the LoRA layer at ``path``: ``<path>.lora_A.weight``,
    ``<path>.lora_B.weight``."""
    return f"{path}.{A_KEY}", f"{path}.{B_KEY}"


def adapter_shapes(in_features: int, out_features: int, r: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The shapes of a LoRA (DoRA) layer's adapter tensors under their keys below its path, as
    ``LoRALinear.adapter_tensors`` (``DoRALinear``'s) holds them."""
    shapes = {A_KEY: (r, in_features), B_KEY: (out_features, r)}
    return {**shapes, MAGNITUDE_KEY: (out_features,)} if use_dora else shapes


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(AdapterLayer):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T`` with frozen W, b and trainable A, B.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: LoRA rank (>= 1).
        lora_alpha: scaling numerator; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
            ``use_rslora``).
        lora_dropout: dropout on the LoRA branch input, active in ``train()`` mode.
        bias: whether the base layer has a bias.
        device, dtype: of the base weight. A and B are float32 on a float16 / bfloat16
            base (PEFT's default), else the base's dtype.

    Init follows PEFT: A kaiming-uniform (a = sqrt(5)), B zeros, so the layer starts as
    its base. ``merge()`` folds ``scaling * B A`` into W (forward becomes a plain linear),
    ``unmerge()`` takes it out again.

    ``from_linear`` / ``from_conv1d`` wrap an existing layer, sharing its parameters. A
    wrapped transformers ``Conv1D`` keeps its ``[in, out]`` weight (``fan_in_fan_out``
    is then True): the op is handed the transposed view, A and B keep PEFT's layouts, and
    merging adds the transposed delta, exactly as PEFT's ``fan_in_fan_out``.
    """

    ADAPTER_KIND = "LoRA"
    use_dora = False
    # Whether the wrapped layer's weight was already an FSDP2 shard at wrap time (an adapter
    # loaded into a sharded model): FSDP2 then gathers it into the wrapped module, where the
    # forward reads it, not into this layer.
    _wraps_sharded_base = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(base, LINEAR, r, lora_alpha, lora_dropout, use_rslora, None, True)

    @classmethod
    def wrap(
        cls,
        base: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        lora_dtype: torch.dtype | None = None,
        init_lora_weights: bool | str = True,
    ) -> "LoRALinear":
        """Wrap an existing base layer of any kind in
        ``fastpeft.methods.base_layers.BASE_LAYER_KINDS`` (``nn.Linear``, transformers'
        ``Conv1D`` with PEFT's ``fan_in_fan_out`` semantics, bitsandbytes' quantized layers in a
        ``QuantLoRALinear``): its weight and bias are shared (not copied) and frozen; TypeError
        for another module.

        ``lora_dtype`` is the dtype of A and B (default: float32 on a float16 / bfloat16 base,
        as PEFT and ``fastpeft.inject``, else the base weight's). ``init_lora_weights`` as in
        ``reset_lora_parameters``.
        """
        kind = require_base_layer(base, "base")
        return cls._wrap(base, kind, r, lora_alpha, lora_dropout, use_rslora, lora_dtype, init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *args: Any, **kwargs: Any) -> "LoRALinear":
        """``wrap`` (same arguments) for an ``nn.Linear``; TypeError for another module."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls.wrap(linear, *args, **kwargs)

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, *args: Any, **kwargs: Any) -> "LoRALinear":
        """``wrap`` (same arguments) for a transformers ``Conv1D`` (weight ``[in, out]``,
        GPT-2); TypeError for another module."""
        if not is_conv1d(conv1d):
            raise TypeError(f"conv1d must be a transformers Conv1D (weight [in, out]), got {type(conv1d).__name__}")
        return cls.wrap(conv1d, *args, **kwargs)

    @classmethod
    def _layer_class(cls, kind: BaseLayerKind) -> type["LoRALinear"]:
        """The class that wraps a base of ``kind``: the quantized variant for a quantized base."""
        return QuantLoRALinear if kind.quantized else cls

    @classmethod
    def _wrap(cls, base: nn.Module, kind: BaseLayerKind, *args) -> "LoRALinear":
        layer_cls = cls._layer_class(kind)
        layer = layer_cls.__new__(layer_cls)
        nn.Module.__init__(layer)
        layer._init_from(base, kind, *args)
        return layer

    def _init_from(
        self,
        base: nn.Module,
        kind: BaseLayerKind,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        lora_dtype: torch.dtype | None,
        init_lora_weights: bool | str,
    ) -> None:
        self.r = _require_rank(r)
        require_finite("lora_alpha", lora_alpha)
        self.lora_alpha = lora_alpha
        self.lora_dropout = require_probability("lora_dropout", lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.fan_in_fan_out = kind.fan_in_fan_out
        weight, bias = base.weight, base.bias
        self.in_features, self.out_features = kind.features(base)
        self.weight = weight
        self.bias = bias
        self._wraps_sharded_base = is_sharded(weight)
        # The wrapped module, not registered as a submodule (its parameters are this layer's
        # own): ``base_module()`` hands it back, e.g. to unload the adapter.
        object.__setattr__(self, "_base_module", base)
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": lora_dtype or default_lora_dtype(kind.base_dtype(base))}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters(init_lora_weights)
        self.merged = False

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's inits: ``True`` A kaiming-uniform with a = sqrt(5), B zeros (the default);
        ``"gaussian"`` A normal with std 1/r, B zeros; ``False`` both as ``nn.Linear``'s
        default (kaiming-uniform, a = sqrt(5)), so the adapter is not a no-op."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(a, std=1 / self.r)
            nn.init.zeros_(b)
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters under their keys below the layer's path (PEFT's saved keys
        less ``base_model.model.<path>.``): ``lora_A.weight``, ``lora_B.weight``."""
        return {A_KEY: self.lora_A.weight, B_KEY: self.lora_B.weight}

    def _base_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight and bias the forward uses: this layer's, or the wrapped module's
        where FSDP2 gathers them (``_wraps_sharded_base``)."""
        owner = self._base_module if self._wraps_sharded_base else self
        return owner.weight, owner.bias

    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for fan_in_fan_out)."""
        weight = self._base_tensors()[0]
        return weight.t() if self.fan_in_fan_out else weight

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in the base weight's layout (``[out, in]``, or ``[in, out]`` with
        fan_in_fan_out), computed in fp32 and cast to the base weight's dtype."""
        a = self.lora_A.weight.detach().float()
        b = self.lora_B.weight.detach().float()
        delta = (b @ a) * self.scaling
        return (delta.t() if self.fan_in_fan_out else delta).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; forward is then a plain linear."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged")
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def base_module(self) -> nn.Module:
        """The wrapped ``nn.Linear`` / ``Conv1D``, holding this layer's current weight and bias
        and its train/eval mode. It computes the base layer, or the merged one after ``merge()``."""
        base = self._synced_base()
        return base.train(self.training) if base.training != self.training else base

    def _synced_base(self) -> nn.Module:
        """The wrapped module with this layer's current weight and bias, re-registered only
        when they changed (a registration per forward costs more than the rest of a QLoRA
        layer's Python work). FSDP2 swaps its sharded and all-gathered parameters into this
        layer: without the sync the wrapped module would keep the original full weight alive
        after sharding (FSDP2 frees it only once nothing else holds it). A layer wrapping an
        already sharded base leaves the wrapped module as FSDP2 set it."""
        base = self._base_module
        if self._wraps_sharded_base:
            return base
        if base.weight is not self.weight:
            base.weight = self.weight
        if base.bias is not self.bias:
            base.bias = self.bias
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer (merged: nothing more), plus the LoRA term: the fused op, or, when
        ``lora_A`` / ``lora_B`` are FSDP units of their own (``fastpeft.methods.sharding``), the
        base layer plus ``scaling * lora_B(lora_A(dropout(x)))`` through their forwards."""
        self._synced_base()  # lets go of weights FSDP2 replaced (cheap: identity checks)
        if self.merged:
            return self._base_forward(x)
        if sharded_apart(self.lora_A, self.lora_B):
            return self._forward_apart(x)
        return self._fused_forward(x)

    def _forward_apart(self, x: torch.Tensor) -> torch.Tensor:
        """The forward when ``lora_A`` / ``lora_B`` are FSDP units of their own (``forward``)."""
        return self._base_forward(x) + self._lora_through_submodules(x)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight_out_in(), self._base_tensors()[1])

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(
            x, self._weight_out_in(), self._base_tensors()[1], self.lora_A.weight, self.lora_B.weight,
            self.scaling, self.lora_dropout, self.training,
        )

    def _lora_through_submodules(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * lora_B(lora_A(dropout(x)))`` in x's dtype, A and B called as modules (so
        FSDP2 gathers their weights), x cast to A's dtype first, as PEFT's ``lora.Linear``."""
        h = F.dropout(x.to(self.lora_A.weight.dtype), self.lora_dropout, self.training)
        return (self.lora_B(self.lora_A(h)) * self.scaling).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, bias={self.bias is not None}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )


class QuantLoRALinear(QuantizedBaseState, LoRALinear):
    """LoRA on a bitsandbytes-quantized base layer (QLoRA): ``Linear4bit`` (NF4 / FP4, double
    quantization) or ``Linear8bitLt`` (frozen int8), which ``LoRALinear.wrap`` (and so
    ``fastpeft.inject``) wraps in this class. Parameters and state-dict keys as ``LoRALinear``'s
    (the base layer's own keys, quantization state included, for the base weight).

    The forward is ``fastpeft.ops.qlora_linear`` on the packed weight (on the CPU bitsandbytes'
    base output bit for bit, plus PEFT's LoRA term); A and B are float32 by default (PEFT's).
    State dicts: ``QuantizedBaseState`` (bitsandbytes' entries for the base; loading them back is
    refused). ``merge()``
    merges as PEFT does: dequantize, add ``scaling * B A``, requantize into a new weight of the
    same settings (with PEFT's warning about rounding); ``unmerge()`` subtracts the same way
    (so a merge and unmerge round trip requantizes twice).
    """

    def _init_from(self, base: nn.Module, kind: BaseLayerKind, *args: Any) -> None:
        super()._init_from(base, kind, *args)
        self._adopt_quantized_base(base)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` ``[out, in]`` in float32 (it is added to a dequantized weight)."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("QuantLoRALinear.merge(): the adapter is already merged")
        self._add_delta(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("QuantLoRALinear.unmerge(): the adapter is not merged")
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        base = self.base_module()
        add_to_quantized(base, self.delta_weight(), sign)
        self.weight = base.weight

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (merged) base layer: the dequantized weight in its compute dtype."""
        weight = self.quantized_base_weight()
        dtype = weight.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), weight.dequantize(dtype), bias).to(x.dtype)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self.quantized_base_weight(), self.bias, self.lora_A.weight, self.lora_B.weight,
                            self.scaling, self.lora_dropout, self.training)

    def quantized_base_module(self) -> nn.Module:
        return self.base_module()
