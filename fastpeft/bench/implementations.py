"""The implementations compared, built on the same weights.

- ``base``: the frozen layer alone, ``F.linear(x, W, b)`` (the yardstick for ratios).
- ``naive``: PEFT's formula in plain PyTorch (``fastpeft.kernels.lora.ref``).
- ``peft``: HF PEFT's own ``lora.Linear`` (made by ``get_peft_model`` on a one-Linear module).
- ``compile``: ``torch.compile`` of ``naive``.
- ``fastpeft``: ``fastpeft.LoRALinear`` (the layer users get; it runs ``fastpeft.ops.lora_linear``).

The grid puts all tensors (x, W, b, A, B) in one dtype ("all bf16" on GPU): PEFT is built with
``autocast_adapter_dtype=False`` so it does not upcast its adapter to fp32. Weights made with
``random_weights(..., lora_dtype=torch.float32)`` keep fp32 adapters in every implementation
(PEFT's default on a 16-bit model; the focused benchmark times both).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.bench.cases import LayerShape
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.kernels.lora.ref import lora_linear_ref

# lora_alpha = 2 r (scaling 2), the usual PEFT setting; any nonzero scaling exercises the
# same kernels, and all implementations get the same value.
LORA_ALPHA_PER_RANK = 2

BASE, NAIVE, PEFT, COMPILE, FASTPEFT = "base", "naive", "peft", "compile", "fastpeft"


@dataclass(frozen=True)
class LoRAWeights:
    """Frozen W ``[N, K]`` and b ``[N]``; LoRA A ``[r, K]``, B ``[N, r]``; ``scaling`` = alpha / r."""

    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_alpha: int

    @property
    def r(self) -> int:
        return self.lora_a.shape[0]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def random_weights(
    shape: LayerShape, r: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator,
    lora_dtype: torch.dtype | None = None,
) -> LoRAWeights:
    """Random weights with a trained layer's scale (std ``1/sqrt(fan_in)``); B is nonzero so the
    LoRA branch is not timed on zeros. W and b in ``dtype``, A and B in ``lora_dtype`` (default
    ``dtype``)."""
    n, k = shape.out_features, shape.in_features

    def randn(*size: int, fan_in: int, to: torch.dtype = dtype) -> torch.Tensor:
        t = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
        return (t / fan_in**0.5).to(to)

    return LoRAWeights(
        weight=randn(n, k, fan_in=k),
        bias=randn(n, fan_in=k),
        lora_a=randn(r, k, fan_in=k, to=lora_dtype or dtype),
        lora_b=randn(n, r, fan_in=r, to=lora_dtype or dtype),
        lora_alpha=LORA_ALPHA_PER_RANK * r,
    )


@dataclass(frozen=True)
class Implementation:
    """``forward`` maps x ``[M, K]`` to y ``[M, N]``. ``trainable``: the LoRA leaves to take
    grads for besides x (empty for ``base``). ``owned``: every weight tensor it holds, which
    the saved-activation accounting excludes."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    trainable: tuple[torch.Tensor, ...]
    owned: tuple[torch.Tensor, ...]


Builder = Callable[[LoRAWeights, float, bool], Implementation]


def _build_base(w: LoRAWeights, dropout_p: float, training: bool) -> Implementation:
    return Implementation(BASE, lambda x: F.linear(x, w.weight, w.bias), (), (w.weight, w.bias))


def _functional_builder(name: str, get_op: Callable[[], Callable[..., torch.Tensor]]) -> Builder:
    """Builder for an op with ``lora_linear_ref``'s signature; A and B become fresh leaves."""

    def build(w: LoRAWeights, dropout_p: float, training: bool) -> Implementation:
        op = get_op()
        a = w.lora_a.detach().requires_grad_()
        b = w.lora_b.detach().requires_grad_()

        def forward(x: torch.Tensor) -> torch.Tensor:
            return op(x, w.weight, w.bias, a, b, w.scaling, dropout_p, training)

        return Implementation(name, forward, (a, b), (w.weight, w.bias, a, b))

    return build


# Graphs of the compiled function a full grid needs: grad on/off x dropout 0.05/0.1 x the
# M = 1 specialisation x sizes dynamo assumes equal (M == r, N == K): 12 counted on the GPU
# grid's pattern of sizes. Dynamo's default limit (8) would fall back to eager mid-run.
COMPILE_RECOMPILE_LIMIT = 32


@functools.cache
def _compiled_lora_linear_ref() -> Callable[..., torch.Tensor]:
    # One compiled function for the whole run, dynamic in every size, so that the grid costs
    # about a dozen compilations instead of three per case. `cache_size_limit` is the name
    # every torch >= 2.6 accepts (newer ones alias it to `recompile_limit`).
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, COMPILE_RECOMPILE_LIMIT)
    return torch.compile(lora_linear_ref, dynamic=True)


def _frozen_linear(w: LoRAWeights) -> nn.Linear:
    """An ``nn.Linear`` whose frozen parameters share W's and b's storage."""
    n, k = w.weight.shape
    linear = torch.nn.utils.skip_init(nn.Linear, k, n, device=w.weight.device, dtype=w.weight.dtype)
    linear.weight = nn.Parameter(w.weight, requires_grad=False)
    linear.bias = nn.Parameter(w.bias, requires_grad=False)
    return linear


def _module_implementation(
    name: str, module: nn.Module, lora_a: nn.Parameter, lora_b: nn.Parameter, w: LoRAWeights, training: bool
) -> Implementation:
    """Load ``w``'s A and B into a LoRA layer's parameters: the layer in W's dtype, its
    adapter in A's (fp32 adapters on a bf16 layer stay fp32)."""
    module.to(w.weight.dtype).train(training)
    with torch.no_grad():
        lora_a.data = w.lora_a.clone()
        lora_b.data = w.lora_b.clone()
    return Implementation(name, module, (lora_a, lora_b), tuple(module.parameters()))


def _build_peft(w: LoRAWeights, dropout_p: float, training: bool) -> Implementation:
    from peft import LoraConfig, get_peft_model

    class OneLinear(nn.Module):
        def __init__(self, proj: nn.Linear) -> None:
            super().__init__()
            self.proj = proj

    config = LoraConfig(r=w.r, lora_alpha=w.lora_alpha, lora_dropout=dropout_p, target_modules=["proj"])
    model = get_peft_model(OneLinear(_frozen_linear(w)), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    adapter = layer.active_adapters[0]
    return _module_implementation(
        PEFT, layer, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, w, training
    )


def _build_fastpeft(w: LoRAWeights, dropout_p: float, training: bool) -> Implementation:
    import fastpeft

    layer = fastpeft.LoRALinear.from_linear(
        _frozen_linear(w), r=w.r, lora_alpha=w.lora_alpha, lora_dropout=dropout_p
    )
    return _module_implementation(FASTPEFT, layer, layer.lora_A.weight, layer.lora_B.weight, w, training)


# The op itself, under whatever FASTPEFT_BACKEND is set when it is called: the focused
# benchmark (``fastpeft.bench.focused``) forces fused / hybrid / torch per row with it. Not a
# row of the grid, whose ``fastpeft`` row is the layer users get.
FASTPEFT_OP = "fastpeft-op"
build_fastpeft_op: Builder = _functional_builder(FASTPEFT_OP, lambda: lora_linear)

BUILDERS: dict[str, Builder] = {
    BASE: _build_base,
    NAIVE: _functional_builder(NAIVE, lambda: lora_linear_ref),
    PEFT: _build_peft,
    COMPILE: _functional_builder(COMPILE, _compiled_lora_linear_ref),
    FASTPEFT: _build_fastpeft,
}
IMPLEMENTATION_NAMES: tuple[str, ...] = tuple(BUILDERS)


def default_implementations() -> tuple[str, ...]:
    """Every implementation, less ``peft`` when PEFT is not installed."""
    peft_installed = importlib.util.find_spec("peft") is not None
    return tuple(name for name in IMPLEMENTATION_NAMES if name != PEFT or peft_installed)


def build_implementation(name: str, w: LoRAWeights, dropout_p: float, training: bool) -> Implementation:
    """Implementation ``name`` on weights ``w``; dropout ``dropout_p`` is active when ``training``."""
    return BUILDERS[name](w, dropout_p, training)
