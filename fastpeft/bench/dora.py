"""The DoRA benchmark (issue "Fused DoRA"): one ``hidden x hidden`` linear with a rank-``r``
DoRA adapter, forward (inference, eval mode) and forward+backward (training mode; x, A, B and
the magnitude get gradients), with and without dropout.

Rows (every layer holds the same W, b, A, B and magnitude):

- ``base``: ``F.linear`` alone: the floor.
- ``peft-lora``: HF PEFT's plain LoRA layer on the same W, A, B: what DoRA costs over LoRA in
  PEFT (peft#1474 reports ~2x per step).
- ``peft``: HF PEFT's DoRA layer (``lora.Linear`` with ``use_dora=True``; its optional
  ``ENABLE_DORA_CACHING`` left at its default, off).
- ``lora``: fastpeft's ``LoRALinear``: what the DoRA layer's inference is held against.
- ``torch``: fastpeft's ``DoRALinear`` (``fastpeft.ops.dora_linear``, its torch path; at
  inference the row norm is cached, as the layer does in eval mode).

Cases: M rows, hidden size, rank, dropout (the forward runs in eval mode, where dropout is off,
so cases with dropout are timed forward+backward only).
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, MODES
from fastpeft.bench.implementations import LORA_ALPHA_PER_RANK
from fastpeft.bench.op_bench import OpRow, OpSpec, OpTarget, Ratio, Step, mode_step

BASE, PEFT_LORA, PEFT, LORA, TORCH = "base", "peft-lora", "peft", "lora", "torch"


@dataclass(frozen=True)
class DoRACase:
    """x ``[m, hidden]`` through a ``hidden x hidden`` linear with a rank-``r`` DoRA adapter."""

    m: int
    hidden: int
    r: int
    dropout: float

    @property
    def label(self) -> str:
        return f"M={self.m} H={self.hidden} r={self.r} p={self.dropout:g}"

    def fields(self) -> dict[str, Any]:
        return {"M": self.m, "hidden": self.hidden, "r": self.r, "dropout": self.dropout}


def grid(ms: tuple[int, ...], hidden: int, ranks: tuple[int, ...], dropouts: tuple[float, ...]) -> tuple[DoRACase, ...]:
    return tuple(DoRACase(m, hidden, r, p) for p, r, m in itertools.product(dropouts, ranks, ms))


# Decode (1), a prefill chunk (512) and a training batch (4096) on Llama-7B's width, dropout off
# and PEFT's common 0.05.
GPU_CASES = grid((1, 512, 4096), 4096, (16,), (0.0, 0.05))
# CPU: fp32 on two cores, a smaller width, in well under a minute.
CPU_CASES = grid((16, 256), 1024, (16,), (0.0, 0.05))
# --quick (CI): one small case.
QUICK_CASES = grid((16,), 128, (8,), (0.0,))


@dataclass(frozen=True)
class DoRAProblem:
    """W ``[N, K]``, b ``[N]`` (frozen), A ``[r, K]``, B ``[N, r]``, m ``[N]`` (fp32 leaves every
    row's layer holds), x ``[M, K]`` (a leaf) and dOut ``[M, N]``."""

    case: DoRACase
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    magnitude: nn.Parameter
    x: torch.Tensor
    grad_out: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.weight, self.bias, self.lora_a, self.lora_b, self.magnitude, self.x,
                                      self.grad_out))

    def linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding W and b (frozen), on the problem's device."""
        layer = nn.Linear(self.case.hidden, self.case.hidden, device=self.weight.device, dtype=self.weight.dtype)
        layer.weight = nn.Parameter(self.weight, requires_grad=False)
        layer.bias = nn.Parameter(self.bias, requires_grad=False)
        return layer


def make_problem(case: DoRACase, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> DoRAProblem:
    """Trained-looking weights: W with a trained layer's scale, B random (not PEFT's zeros), the
    magnitude 10% off the row norms of ``W + s B A`` (so the scale ``c`` is not 1)."""
    def randn(*size: int, scale: float = 1.0, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dt)

    k = n = case.hidden
    weight, bias = randn(n, k, scale=k**-0.5, dt=dtype), randn(n, scale=k**-0.5, dt=dtype)
    lora_a, lora_b = randn(case.r, k, scale=k**-0.5), randn(n, case.r, scale=case.r**-0.5)
    norm = torch.linalg.norm(weight.float() + LORA_ALPHA_PER_RANK * lora_b @ lora_a, dim=1)
    magnitude = norm * (1 + 0.1 * randn(n))
    return DoRAProblem(case, weight, bias, nn.Parameter(lora_a), nn.Parameter(lora_b), nn.Parameter(magnitude),
                       randn(case.m, k, dt=dtype).requires_grad_(), randn(case.m, n, dt=dtype))


def _mode(layer: nn.Module, mode: str) -> nn.Module:
    """Eval mode for inference (a layer's caches and dropout-off path), training mode otherwise."""
    return layer.train(mode == FORWARD_BACKWARD)


def _grad_inputs(p: DoRAProblem, dora: bool) -> tuple[torch.Tensor, ...]:
    return (p.x, p.lora_a, p.lora_b, p.magnitude) if dora else (p.x, p.lora_a, p.lora_b)


def _base_row(p: DoRAProblem, mode: str) -> Step:
    return mode_step(lambda: F.linear(p.x, p.weight, p.bias), mode, (p.x,), p.grad_out)


def _peft_row(dora: bool):
    def build(p: DoRAProblem, mode: str) -> Step:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear

        r, alpha = p.case.r, LORA_ALPHA_PER_RANK * p.case.r
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p.case.dropout, use_dora=dora)
        layer = Linear(p.linear(), "default", config=config, r=r, lora_alpha=alpha, lora_dropout=p.case.dropout,
                       use_dora=dora)
        layer.lora_A["default"].weight, layer.lora_B["default"].weight = p.lora_a, p.lora_b
        if dora:
            layer.lora_magnitude_vector["default"].weight = p.magnitude
        _mode(layer, mode)
        return mode_step(lambda: layer(p.x), mode, _grad_inputs(p, dora), p.grad_out)

    return build


def _fastpeft_row(dora: bool):
    def build(p: DoRAProblem, mode: str) -> Step:
        from fastpeft.methods.lora.dora_layer import DoRALinear
        from fastpeft.methods.lora.layer import LoRALinear

        layer = (DoRALinear if dora else LoRALinear).wrap(p.linear(), p.case.r, LORA_ALPHA_PER_RANK * p.case.r,
                                                          p.case.dropout)
        layer.lora_A.weight, layer.lora_B.weight = p.lora_a, p.lora_b
        if dora:
            layer.lora_magnitude_vector = p.magnitude
        _mode(layer, mode)
        return mode_step(lambda: layer(p.x), mode, _grad_inputs(p, dora), p.grad_out)

    return build


def _peft_unavailable(device: torch.device) -> str | None:
    return None if importlib.util.find_spec("peft") else "peft is not installed"


def _timed(case: DoRACase, mode: str) -> bool:
    """Forward (eval mode: dropout off) only for the cases without dropout."""
    return mode == FORWARD_BACKWARD or case.dropout == 0.0


ROWS: tuple[OpRow, ...] = (
    OpRow(BASE, "F.linear alone: the floor", _base_row, applies=_timed),
    OpRow(PEFT_LORA, "HF PEFT's plain LoRA layer on the same W, A, B", _peft_row(False), _peft_unavailable,
          applies=_timed),
    OpRow(PEFT, "HF PEFT's DoRA layer (lora.Linear, use_dora=True)", _peft_row(True), _peft_unavailable,
          applies=_timed),
    OpRow(LORA, "fastpeft LoRALinear on the same W, A, B", _fastpeft_row(False), applies=_timed),
    OpRow(TORCH, "fastpeft DoRALinear (fastpeft.ops.dora_linear, torch path; inference: cached row norm)",
          _fastpeft_row(True), applies=_timed),
)
ROW_NAMES = tuple(r.name for r in ROWS)

VS_PEFT = "vs PEFT DoRA"
X_LORA = "x fastpeft LoRA"
X_BASE = "x base"

SPEC = OpSpec(
    name="dora",
    title="DoRA linear (fastpeft.ops.dora_linear) against PEFT's DoRA and LoRA",
    make_problem=make_problem,
    rows=ROWS,
    modes=MODES,
    ratios=(Ratio(VS_PEFT, PEFT, speedup=True), Ratio(X_LORA, LORA, speedup=False),
            Ratio(X_BASE, BASE, speedup=False)),
    metrics=(),
    targets=(
        OpTarget("faster than PEFT's DoRA layer (CPU torch path, now)", VS_PEFT, 1.0, False, (TORCH,),
                 lambda c, mode: True),
        OpTarget(">= 2x PEFT's DoRA training step at M=4096 (GPU)", VS_PEFT, 2.0, False, (TORCH,),
                 lambda c, mode: mode == FORWARD_BACKWARD and c.m == 4096),
        OpTarget("inference (cached scale) <= 1.05x fastpeft's LoRA layer", X_LORA, 1.05, True, (TORCH,),
                 lambda c, mode: mode == FORWARD),
    ),
    notes=("'vs PEFT DoRA' = PEFT DoRA's time / time (> 1: faster); 'x fastpeft LoRA' / 'x base' = time / "
           "that row's",),
)


def settings(dtype: torch.dtype) -> dict[str, Any]:
    return {"dtype": str(dtype).removeprefix("torch."), "lora_alpha": f"{LORA_ALPHA_PER_RANK} x rank",
            "adapter_dtype": "float32", "peft_dora_caching": "off (PEFT's default)"}
