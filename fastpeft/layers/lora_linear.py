"""``LoRALinear``: a drop-in ``nn.Linear`` with a LoRA adapter, run by the fused op.

Parameters are named and shaped as HF PEFT's ``lora.Linear`` (``weight``, ``bias``,
``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``) so state-dict keys line up.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.ops.checks import require_probability
from fastpeft.ops.lora_linear import lora_linear


def _require_rank(r: object) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int >= 1, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    return r


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T`` with frozen W, b and trainable A, B.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: LoRA rank (>= 1).
        lora_alpha: scaling numerator; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
            ``use_rslora``).
        lora_dropout: dropout on the LoRA branch input, active in ``train()`` mode.
        bias: whether the base layer has a bias.
        device, dtype: of the base weight; the LoRA weights take the same.

    Init follows PEFT: A kaiming-uniform (a = sqrt(5)), B zeros, so the layer starts as
    its base. ``merge()`` folds ``scaling * B A`` into W (forward becomes a plain linear),
    ``unmerge()`` takes it out again.
    """

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
        self._init_from(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora)
        return layer

    def _init_from(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
    ) -> None:
        self.r = _require_rank(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = require_probability("lora_dropout", lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()
        self.merged = False

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform with a = sqrt(5), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` ``[out, in]``, computed in fp32 and cast to the base weight's dtype."""
        a = self.lora_A.weight.detach().float()
        b = self.lora_B.weight.detach().float()
        return ((b @ a) * self.scaling).to(self.weight.dtype)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight,
            self.scaling, self.lora_dropout, self.training,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, bias={self.bias is not None}, merged={self.merged}"
        )
