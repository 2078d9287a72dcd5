"""``BottleneckAdapter``: a Houlsby / Pfeiffer bottleneck adapter module, run by the fused op.

    out = residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)

(``residual`` defaults to ``h``.) Parameters are AdapterHub's ``Adapter`` module's, without its
``nn.Sequential`` level: ``adapter_down`` ``[R, D]`` + bias (AdapterHub: ``adapter_down.0``),
``adapter_up`` ``[D, R]`` + bias, and with ``scaling="learned"`` a trainable 1-element
``scaling`` (AdapterHub's ``nn.Parameter(torch.ones(1))``). Where to place it in a model, and
AdapterHub's files, are the model level's business (``fastpeft.methods.bottleneck.model``) (``AdapterConfig``).

Dropout is applied to the adapter's input (the op fuses it and regenerates the mask in the
backward); AdapterHub drops its output instead. Both are the identity outside ``train()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fastpeft.kernels.bottleneck.ref import CANONICAL_ACTIVATIONS, canonical_activation
from fastpeft.methods.sharding import sharded_apart
from fastpeft.ops.bottleneck_adapter import bottleneck_adapter
from fastpeft.ops.checks import require_finite, require_probability

# Inits by name. AdapterHub's: "bert" (N(0, 0.02) weights, zero biases), "mam_adapter"
# (down kaiming-uniform a=sqrt(5), up zero: the adapter starts as the identity) and
# "houlsby" (both truncated N(0, 0.01^2) in +-0.02, zero biases). "mam" is short for
# "mam_adapter" and "lora" names the same init after LoRA's (A kaiming-uniform, B zero).
INITS = ("bert", "mam_adapter", "mam", "lora", "houlsby")
IDENTITY_INITS = ("mam_adapter", "mam", "lora")
# AdapterHub's init_bert_weights std (BERT's initializer_range).
_BERT_STD = 0.02
# AdapterHub's "houlsby" init: trunc_normal_(std=1e-2, a=-2e-2, b=2e-2).
_HOULSBY_STD = 1e-2
LEARNED = "learned"


def bottleneck_size_for(hidden_size: int, reduction_factor: float) -> int:
    """AdapterHub's bottleneck width: ``int(hidden_size // reduction_factor)``, at least 1."""
    return max(1, int(hidden_size // reduction_factor))


def _require_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"BottleneckAdapter: {name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"BottleneckAdapter: {name} must be >= 1, got {value}")
    return value


def _check_scaling(scaling: object) -> float | str:
    if isinstance(scaling, str):
        if scaling != LEARNED:
            raise ValueError(f"BottleneckAdapter: scaling must be a number or 'learned', got {scaling!r} "
                             "(AdapterHub's per-channel 'channel' scaling is not implemented)")
        return scaling
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"BottleneckAdapter: scaling must be a number or 'learned', got {type(scaling).__name__}")
    require_finite("scaling", scaling)
    return float(scaling)


class BottleneckAdapter(nn.Module):
    """``out = residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)``.

    Args:
        hidden_size: D, the width of ``h``.
        bottleneck_size: R; default AdapterHub's ``max(1, int(hidden_size // reduction_factor))``.
        reduction_factor: used when ``bottleneck_size`` is None (> 0; below 1 widens).
        non_linearity: AdapterHub's activation names: relu, gelu (erf), gelu_new /
            gelu_pytorch_tanh / gelu_fast (tanh), swish / silu, linear / identity.
        scaling: a number, or ``"learned"``: a trainable 1-element parameter starting at 1.
        dropout: probability of dropping elements of the adapter's input in ``train()``.
        init: ``"bert"`` (default), ``"mam_adapter"`` (alias ``"mam"``, ``"lora"``: starts as
            the identity) or ``"houlsby"``; see ``reset_parameters``.
        device, dtype: of the parameters.

    ``forward(h, residual=None)`` takes ``h [..., D]`` and returns the same shape; ``residual``
    (like ``h``) replaces ``h`` as the term the adapter's output is added to.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int | None = None,
        reduction_factor: float = 16,
        non_linearity: str = "relu",
        scaling: float | str = 1.0,
        dropout: float = 0.0,
        init: str = "bert",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = _require_positive_int("hidden_size", hidden_size)
        if bottleneck_size is None:
            if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)):
                raise TypeError(f"BottleneckAdapter: reduction_factor must be a number > 0, got {reduction_factor!r}")
            if not (math.isfinite(reduction_factor) and reduction_factor > 0):
                raise ValueError(f"BottleneckAdapter: reduction_factor must be finite and > 0, got {reduction_factor}")
            bottleneck_size = bottleneck_size_for(hidden_size, reduction_factor)
        self.bottleneck_size = _require_positive_int("bottleneck_size", bottleneck_size)
        canonical_activation(non_linearity)  # raises ValueError naming the accepted names
        self.non_linearity = non_linearity.lower()
        self.dropout = require_probability("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        self.adapter_down = nn.Linear(hidden_size, self.bottleneck_size, **factory)
        self.adapter_up = nn.Linear(self.bottleneck_size, hidden_size, **factory)
        scaling = _check_scaling(scaling)
        if scaling == LEARNED:
            self.scaling = nn.Parameter(torch.ones(1, **factory))
        else:
            self.scaling = scaling
        self.reset_parameters(init)

    @property
    def learned_scaling(self) -> bool:
        """Whether ``scaling`` is a trainable parameter (``scaling="learned"``)."""
        return isinstance(self.scaling, nn.Parameter)

    @torch.no_grad()
    def reset_parameters(self, init: str = "bert") -> None:
        """AdapterHub's inits of the projections (a learned scaling is left as it is):

        * ``"bert"``: both weights N(0, 0.02^2), biases zero;
        * ``"mam_adapter"`` / ``"mam"`` / ``"lora"``: down weight kaiming-uniform
          (a = sqrt(5)), up weight and both biases zero, so the adapter adds exactly 0;
        * ``"houlsby"``: both weights truncated N(0, 0.01^2) within +-0.02, biases zero.
        """
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"BottleneckAdapter: init must be one of {INITS}, got {init!r}")
        down, up = self.adapter_down, self.adapter_up
        if init == "bert":
            down.weight.normal_(0.0, _BERT_STD)
            up.weight.normal_(0.0, _BERT_STD)
        elif init in IDENTITY_INITS:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            up.weight.zero_()
        else:
            for w in (down.weight, up.weight):
                nn.init.trunc_normal_(w, mean=0.0, std=_HOULSBY_STD, a=-2 * _HOULSBY_STD, b=2 * _HOULSBY_STD)
        down.bias.zero_()
        up.bias.zero_()

    def is_identity(self) -> bool:
        """Whether the adapter adds exactly zero to any input (up weight, up bias or the
        scaling all zero): removing it then changes nothing."""
        up = self.adapter_up
        zero_up = not bool(up.weight.detach().any()) and not bool(up.bias.detach().any())
        zero_scale = not bool(self.scaling.detach().any()) if self.learned_scaling else self.scaling == 0.0
        return zero_up or zero_scale

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The fused op, or, when ``adapter_down`` / ``adapter_up`` are FSDP units of their own
        (``fastpeft.methods.sharding``), the same math through their forwards."""
        if sharded_apart(self.adapter_down, self.adapter_up):
            return self._through_submodules(h, residual)
        return bottleneck_adapter(
            h, self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias,
            activation=self.non_linearity, scaling=self.scaling, residual=residual,
            dropout_p=self.dropout, training=self.training,
        )

    def _through_submodules(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``forward``'s math with ``adapter_down`` and ``adapter_up`` called as modules (so
        FSDP2 gathers their weights): the branch in the weights' dtype, rounded once to h's."""
        activation = CANONICAL_ACTIVATIONS[canonical_activation(self.non_linearity)]
        dtype = self.adapter_down.weight.dtype
        x = nn.functional.dropout(h.to(dtype), self.dropout, self.training)
        branch = self.adapter_up(activation(self.adapter_down(x)))
        base = h if residual is None else residual
        return (base.to(branch.dtype) + self.scaling * branch).to(h.dtype)

    def extra_repr(self) -> str:
        scaling = LEARNED if self.learned_scaling else self.scaling
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"non_linearity={self.non_linearity!r}, scaling={scaling!r}, dropout={self.dropout}")
