"""``DoRALinear``: a ``LoRALinear`` with PEFT's DoRA (weight-decomposed LoRA, ``use_dora=True``).

    y = x W^T + b + (c - 1) * (x' W^T) + c * scaling * (x' A^T B^T),   c = m / ||W + scaling B A||_row

with ``x' = dropout(x)`` and the row norm detached (the DoRA paper's section 4.3, as PEFT). The
magnitude ``m`` (``lora_magnitude_vector``, ``[out]``, the adapter's dtype) trains with A and B; it
starts as the row norms of ``W + scaling B A`` for the initial A and B, so the layer starts as
its LoRA layer does. State-dict key ``<path>.lora_magnitude_vector``: PEFT's saved key (its
model holds ``lora_magnitude_vector.<adapter>.weight``), so a PEFT state dict maps one to one.

The forward is ``fastpeft.ops.dora_linear`` (its torch path; the kernels with
``FASTPEFT_BACKEND=triton``). The squared row norms of the frozen W are computed once and
reused while W is unchanged; at inference (eval mode, grad off) the whole row norm is, while
W, A and B are unchanged (tensor identity, version counter and storage) and until the next
``train()`` / ``eval()``. Not seen: in-place writes that bump no version counter (through
``.data``) while the layer stays in eval mode; call ``eval()`` again after such a write.
``merge()`` folds the layer into ``W' = c * (W + scaling B A)`` (PEFT's merge); ``unmerge()``
divides that scale out again with the scale of the merge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.methods.base_layers import BaseLayerKind
from fastpeft.methods.lora.layer import MAGNITUDE_KEY, LoRALinear, QuantLoRALinear
from fastpeft.methods.quantized_base import add_to_quantized
from fastpeft.methods.sharding import gathered
from fastpeft.ops.dora_linear import dora_linear
from fastpeft.ops.dora_linear_torch import dora_row_norm
from fastpeft.ops.qlora_linear import qlora_linear

def _identity(*tensors: torch.Tensor) -> tuple | None:
    """What a cached value derived from ``tensors`` is valid for: each one's object, in-place
    version (an optimizer step or ``copy_`` bumps it) and storage (``.to()`` moves it); None
    (nothing may be cached) for inference-mode tensors, which keep no version counter."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((id(t), t._version, t.data_ptr(), t.device, t.dtype) for t in tensors)


class DoRALinear(LoRALinear):
    """DoRA on an ``nn.Linear`` or transformers ``Conv1D`` (module docstring). Arguments and
    wrapping as ``LoRALinear``'s; ``wrap`` gives a quantized base a ``QuantDoRALinear``."""

    ADAPTER_KIND = "DoRA"
    use_dora = True

    @classmethod
    def _layer_class(cls, kind: BaseLayerKind) -> type[LoRALinear]:
        return QuantDoRALinear if kind.quantized else cls

    def _init_from(self, base: nn.Module, kind: BaseLayerKind, *args: Any) -> None:
        # name -> (value, what it was computed from: ``_identity``): ``_memo``'s caches
        self._memos: dict[str, tuple[torch.Tensor, tuple]] = {}
        self._merge_scale = None
        super()._init_from(base, kind, *args)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """``LoRALinear``'s inits for A and B, then the magnitude set to the row norms of
        ``W + scaling B A`` (PEFT's DoRA init)."""
        super().reset_lora_parameters(init_lora_weights)
        norm = self.row_norm().to(self.lora_A.weight.dtype)
        if MAGNITUDE_KEY in self._parameters:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(norm)
        else:
            self.lora_magnitude_vector = nn.Parameter(norm)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_tensors(), MAGNITUDE_KEY: self.lora_magnitude_vector}

    def _memo(self, name: str, compute: Callable[[], torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
        """``compute()``, cached under ``name`` while ``sources`` are the same tensors at the same
        versions (``_identity``) and the scaling is the same; computed afresh while
        ``torch.compile`` traces (the compiled graph computes it) and for inference tensors."""
        key = None if torch.compiler.is_compiling() else _identity(*sources)
        if key is None:
            return compute()
        key += (self.scaling,)
        cached = self._memos.get(name)
        if cached is None or cached[1] != key:
            cached = self._memos[name] = (compute(), key)
        return cached[0]

    def _weight_sq_cached(self) -> torch.Tensor:
        """``||W_i||^2`` ``[out]`` in float32, recomputed only when W changes."""
        return self._memo("weight_sq", self._weight_sq_of_base, self._base_tensors()[0])

    def _weight_sq_of_base(self) -> torch.Tensor:
        w = self._dense_weight().detach().float()
        return (w * w).sum(1)

    def _dense_weight(self) -> torch.Tensor:
        """The base weight as a dense ``[out, in]`` tensor (a view of W)."""
        return self._weight_out_in()

    def row_norm(self) -> torch.Tensor:
        """``||W + scaling B A||`` of each output row, ``[out]`` float32 (detached)."""
        with torch.no_grad():
            return dora_row_norm(self._dense_weight(), self.lora_A.weight, self.lora_B.weight, self.scaling,
                                 self._weight_sq_cached())

    def _inference_row_norm(self) -> torch.Tensor | None:
        """The row norm cached for inference (eval mode, grad off): reused while W, A and B are
        the same tensors at the same versions (``_memo``); None in training or with grad on."""
        if self.training or torch.is_grad_enabled():
            return None
        return self._memo("row_norm", self.row_norm, self._base_tensors()[0], self.lora_A.weight, self.lora_B.weight)

    def train(self, mode: bool = True) -> "DoRALinear":
        """``nn.Module.train``, dropping the inference row norm (as PEFT drops its DoRA cache):
        weights changed in ways no version counter sees (FSDP2 regathers, ``.data`` writes)
        are read afresh at the next eval."""
        self._memos.pop("row_norm", None)
        return super().train(mode)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        row_norm = self._inference_row_norm()
        return dora_linear(
            x, self._weight_out_in(), self._base_tensors()[1], self.lora_A.weight, self.lora_B.weight,
            self.lora_magnitude_vector, self.scaling, self.lora_dropout, self.training,
            weight_sq=self._weight_sq_cached() if row_norm is None else None, row_norm=row_norm,
        )

    def _forward_apart(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA composition when ``lora_A`` / ``lora_B`` are FSDP units of their own:
        their weights gathered for the (detached) row norm (``gathered``), the adapter term
        through their forwards (so FSDP2 gathers them and reduces their gradients):
        ``y = x W^T + b + (c - 1) * (x' W^T) + c * scaling * lora_B(lora_A(x'))``, combined in
        float32 and rounded once to x's dtype."""
        with gathered(self.lora_A, self.lora_B):
            norm = self.row_norm()
        scale = self.lora_magnitude_vector.float() / norm
        weight, bias = self._weight_out_in(), self._base_tensors()[1]
        dropout = self.training and self.lora_dropout > 0.0
        dropped = F.dropout(x, self.lora_dropout) if dropout else x
        lora = self.lora_B(self.lora_A(dropped.to(self.lora_A.weight.dtype))) * self.scaling
        base = F.linear(x, weight, bias)
        dropped_base = F.linear(dropped, weight)
        return (base.float() + (scale - 1) * dropped_base.float() + scale * lora.float()).to(x.dtype)

    def _dora_scale(self) -> torch.Tensor:
        """``c = m / ||W + scaling B A||_row`` ``[out]`` float32, for merging."""
        return self.lora_magnitude_vector.detach().float() / self.row_norm()

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- c * (W + scaling B A)`` (PEFT's DoRA merge), per output row; the scale is kept
        for ``unmerge``."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge(): the adapter is already merged")
        scale, dense = self._dora_scale(), self._base_weight_f32()
        self._set_base_weight(self._scaled(dense + self.delta_weight().float(), scale), dense)
        self._merge_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W <- W / c - scaling B A`` with the scale of the merge (PEFT's DoRA unmerge)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge(): the adapter is not merged")
        dense = self._base_weight_f32()
        self._set_base_weight(self._scaled(dense, 1.0 / self._merge_scale) - self.delta_weight().float(), dense)
        self._merge_scale = None
        self.merged = False

    def _base_weight_f32(self) -> torch.Tensor:
        """The base weight in its own layout (``[in, out]`` with fan_in_fan_out), float32."""
        return self.weight.float()

    def _set_base_weight(self, new: torch.Tensor, old: torch.Tensor) -> None:
        """Make ``new`` (float32, the base's layout; ``old`` the weight it replaces) the base weight."""
        self.weight.copy_(new.to(self.weight.dtype))

    def _scaled(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``weight`` (the base's layout) with each output row multiplied by ``scale``."""
        return weight * (scale.view(1, -1) if self.fan_in_fan_out else scale.view(-1, 1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, use_dora=True"


class QuantDoRALinear(QuantLoRALinear, DoRALinear):
    """DoRA on a quantized base (bitsandbytes' NF4 / FP4 / int8, torchao's), PEFT's "QDoRA":
    ``DoRALinear``'s math with the dequantized base weight, which is formed only transiently,
    for the row norm (``||W||^2`` cached: W is frozen), never kept for the backward.

    The forward goes through ``fastpeft.ops.qlora_linear`` (the quantized base product and its
    backward, as ``QuantLoRALinear``'s): without dropout ``z = x W^T + b + s x A^T B^T`` and
    ``y = c * z + (1 - c) * b`` (PEFT's DoRA, the base output reused); with dropout in training
    ``y = (x W^T + b) + (c - 1) * (x' W^T) + c * s * x' A^T B^T``, ``x' = dropout(x)``, with two
    base products and the LoRA term through torch ops, as PEFT computes it. ``merge()`` requantizes
    ``c * (W + s B A)`` (PEFT's DoRA merge on a quantized base), ``unmerge()`` requantizes back.
    """

    def _init_from(self, base: nn.Module, kind: BaseLayerKind, *args: Any) -> None:
        # the magnitude's init reads the dequantized weight: the base's state must be adopted first
        self._adopt_quantized_base(base)
        super()._init_from(base, kind, *args)

    def _dense_weight(self) -> torch.Tensor:
        """The base weight dequantized, ``[out, in]`` float32 (transient)."""
        return self.quantized_base_weight().dequantize(torch.float32)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, a, b = self.quantized_base_weight(), self.bias, self.lora_A.weight, self.lora_B.weight
        norm = self._inference_row_norm()
        scale = self.lora_magnitude_vector.float() / (self.row_norm() if norm is None else norm)
        if not (self.training and self.lora_dropout > 0.0):
            z = qlora_linear(x, weight, bias, a, b, self.scaling)
            y = scale * z.float() + (1.0 - scale) * bias.float() if bias is not None else scale * z.float()
            return y.to(z.dtype)
        dropped = F.dropout(x, self.lora_dropout)
        base = qlora_linear(x, weight, bias, a, b, 0.0)
        dropped_base = qlora_linear(dropped, weight, None, a, b, 0.0)
        lora = F.linear(F.linear(dropped.to(a.dtype), a), b) * self.scaling
        return (base.float() + (scale - 1.0) * dropped_base.float() + scale * lora.float()).to(base.dtype)

    def _forward_apart(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("DoRA on a quantized base with lora_A / lora_B sharded as FSDP units of their own is not "
                         "supported; shard the layer (or its decoder layer) as a whole")

    # DoRALinear's (QuantLoRALinear's come first in the MRO), through the hooks below
    merge = DoRALinear.merge
    unmerge = DoRALinear.unmerge

    def _base_weight_f32(self) -> torch.Tensor:
        return self._dense_weight()

    def _set_base_weight(self, new: torch.Tensor, old: torch.Tensor) -> None:
        """Requantize: ``new - old`` added to the quantized weight gives a new quantized weight
        (with PEFT's warning about the rounding)."""
        base = self.base_module()
        add_to_quantized(base, new - old, 1.0)
        self.weight = base.weight
