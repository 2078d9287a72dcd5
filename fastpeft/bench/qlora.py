"""The QLoRA benchmark (issue 21): one bitsandbytes-quantized linear (K = N = ``hidden``) with a
rank-``r`` LoRA adapter, forward and forward+backward (x, A and B get gradients).

Rows (the same quantized layer, A and B; every module in training mode: bitsandbytes' CPU
inference kernel would rewrite the packed weight in place, see
``fastpeft.methods.quantized_base``):

- ``base``: bitsandbytes' layer alone: the floor.
- ``peft``: HF PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``).
- ``torch`` / ``triton``: fastpeft's ``QuantLoRALinear`` (``fastpeft.ops.qlora_linear``) with
  ``FASTPEFT_BACKEND`` forced: the weight dequantized by torch ops, or by the one-launch Triton
  kernel (a GPU only).

Cases: M rows, hidden size, rank, and the quantization: ``nf4-dq`` (NF4 with double
quantization, QLoRA's recipe) or ``int8``.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastpeft import backend
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, MODES
from fastpeft.bench.forced import forced_backend
from fastpeft.bench.implementations import LORA_ALPHA_PER_RANK
from fastpeft.bench.op_bench import OpRow, OpSpec, OpTarget, Ratio, Step, mode_step

BASE, PEFT, TORCH, TRITON = "base", "peft", "torch", "triton"
FASTPEFT_ROWS = (TORCH, TRITON)
NF4_DQ, INT8 = "nf4-dq", "int8"


@dataclass(frozen=True)
class QLoRACase:
    """x ``[m, hidden]`` through a quantized ``hidden x hidden`` linear with a rank-``r`` adapter."""

    m: int
    hidden: int
    r: int
    quant: str

    @property
    def label(self) -> str:
        return f"M={self.m} H={self.hidden} r={self.r} {self.quant}"

    def fields(self) -> dict[str, Any]:
        return {"M": self.m, "hidden": self.hidden, "r": self.r, "quant": self.quant}


def grid(ms: tuple[int, ...], hidden: int, ranks: tuple[int, ...], quants: tuple[str, ...]) -> tuple[QLoRACase, ...]:
    return tuple(QLoRACase(m, hidden, r, q) for q, r, m in itertools.product(quants, ranks, ms))


# Decode (1, 16), a prefill chunk (512) and a training batch (4096) on Llama-7B's width.
GPU_CASES = grid((1, 16, 512, 4096), 4096, (16,), (NF4_DQ, INT8))
# CPU: fp32 on two cores, a smaller width (a multiple of bitsandbytes' 64-element blocks, where
# its CPU kernel is right), in under a minute.
CPU_CASES = grid((1, 16, 128), 1024, (16,), (NF4_DQ, INT8))
# --quick (CI): one small case.
QUICK_CASES = grid((16,), 256, (8,), (NF4_DQ,))


@dataclass(frozen=True)
class QLoRAProblem:
    """The quantized layer (``base``), A ``[r, K]`` and B ``[N, r]`` (fp32 parameters, PEFT's
    default, which every row's layer holds: the same leaves), x ``[M, K]`` (a leaf) and dOut
    ``[M, N]``."""

    case: QLoRACase
    base: nn.Module
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    x: torch.Tensor
    grad_out: torch.Tensor

    @property
    def nbytes(self) -> int:
        packed = self.base.weight.data
        return sum(t.nbytes for t in (packed, self.lora_a, self.lora_b, self.x, self.grad_out))


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str, dtype: torch.dtype,
                     device: torch.device) -> nn.Module:
    """``weight`` ``[N, K]`` (and ``bias``) as a bitsandbytes layer, quantized as it moves to
    ``device``: ``nf4-dq`` (``Linear4bit``, NF4 with double quantization, compute dtype
    ``dtype``) or ``int8`` (``Linear8bitLt``, frozen int8), in training mode."""
    import bitsandbytes as bnb

    n, k = weight.shape
    if quant == INT8:
        layer = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().cpu(), requires_grad=False)
    return layer.to(device).train()


def quantize_linears(model: nn.Module, quant: str, dtype: torch.dtype, device: torch.device,
                     skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` but those named in ``skip`` replaced by its quantized
    layer (``quantized_linear``), as transformers' ``BitsAndBytesConfig`` loads a model (its
    LM head stays in full precision)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            model.set_submodule(name, quantized_linear(module.weight, module.bias, quant, dtype, device))
    return model


def _quantized(case: QLoRACase, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> nn.Module:
    """A ``hidden x hidden`` layer with a trained layer's scale (std ``1/sqrt(K)``), quantized."""
    k = n = case.hidden
    weight = torch.randn(n, k, generator=generator, device=device) * k**-0.5
    bias = torch.randn(n, generator=generator, device=device) * k**-0.5
    return quantized_linear(weight, bias, case.quant, dtype, device)


def make_problem(case: QLoRACase, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> QLoRAProblem:
    def randn(*size: int, scale: float = 1.0, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dt)

    k = n = case.hidden
    return QLoRAProblem(case, _quantized(case, dtype, device, generator),
                        nn.Parameter(randn(case.r, k, scale=k**-0.5)), nn.Parameter(randn(n, case.r, scale=case.r**-0.5)),
                        randn(case.m, k, dt=dtype).requires_grad_(), randn(case.m, n, dt=dtype))


def _base_row(p: QLoRAProblem, mode: str) -> Step:
    return mode_step(lambda: p.base(p.x), mode, (p.x,), p.grad_out)


def _peft_row(p: QLoRAProblem, mode: str) -> Step:
    from peft import LoraConfig
    from peft.tuners.lora import bnb as peft_bnb

    r, alpha = p.case.r, LORA_ALPHA_PER_RANK * p.case.r
    cls = peft_bnb.Linear8bitLt if p.case.quant == INT8 else peft_bnb.Linear4bit
    layer = cls(p.base, "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha).train()
    layer.lora_A["default"].weight, layer.lora_B["default"].weight = p.lora_a, p.lora_b
    return mode_step(lambda: layer(p.x), mode, (p.x, p.lora_a, p.lora_b), p.grad_out)


def _fastpeft_row(choice: str):
    def build(p: QLoRAProblem, mode: str) -> Step:
        from fastpeft.methods.lora.layer import LoRALinear

        layer = LoRALinear.wrap(p.base, p.case.r, LORA_ALPHA_PER_RANK * p.case.r).train()
        layer.lora_A.weight, layer.lora_B.weight = p.lora_a, p.lora_b

        def forward() -> torch.Tensor:
            with forced_backend(choice):
                return layer(p.x)

        return mode_step(forward, mode, (p.x, p.lora_a, p.lora_b), p.grad_out)

    return build


def _needs_bitsandbytes(device: torch.device) -> str | None:
    return None if importlib.util.find_spec("bitsandbytes") else "bitsandbytes is not installed"


def _peft_unavailable(device: torch.device) -> str | None:
    return _needs_bitsandbytes(device) or (None if importlib.util.find_spec("peft") else "peft is not installed")


def _triton_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    return _needs_bitsandbytes(device) or (None if backend.triton_available() else "the triton package is not installed")


# bitsandbytes' layers are not known to be CUDA-graph capturable (its int8 layer counts outlier
# columns; nothing here checked its 4-bit path under capture): the focused benchmark times every
# row of this op eagerly, like with like.
ROWS: tuple[OpRow, ...] = (
    OpRow(BASE, "bitsandbytes' quantized layer alone (training-mode forward): the floor", _base_row,
          _needs_bitsandbytes, capturable=False),
    OpRow(PEFT, "HF PEFT's QLoRA layer (peft.tuners.lora.bnb) over the same layer", _peft_row, _peft_unavailable,
          capturable=False),
    OpRow(TORCH, "fastpeft QuantLoRALinear (fastpeft.ops.qlora_linear), weight dequantized by torch ops",
          _fastpeft_row("torch"), _needs_bitsandbytes),
    OpRow(TRITON, "fastpeft QuantLoRALinear, weight dequantized by the one-launch Triton kernel",
          _fastpeft_row("triton"), _triton_unavailable),
)
ROW_NAMES = tuple(r.name for r in ROWS)

VS_PEFT = "vs PEFT"
X_BASE = "x base"

SPEC = OpSpec(
    name="qlora",
    title="QLoRA linear (fastpeft.ops.qlora_linear on bitsandbytes bases)",
    make_problem=make_problem,
    rows=ROWS,
    modes=MODES,
    ratios=(Ratio(VS_PEFT, PEFT, speedup=True), Ratio(X_BASE, BASE, speedup=False)),
    metrics=(),
    targets=(
        OpTarget("no slower than PEFT's QLoRA layer (CPU path, now)", VS_PEFT, 1.0, False, (TORCH,),
                 lambda c, mode: True),
        OpTarget(">= 1.5x PEFT's QLoRA training step at M=4096 (GPU)", VS_PEFT, 1.5, False, FASTPEFT_ROWS,
                 lambda c, mode: mode == FORWARD_BACKWARD and c.m == 4096),
        OpTarget("decode (M=1) forward <= 1.1x the base layer alone (GPU)", X_BASE, 1.1, True, FASTPEFT_ROWS,
                 lambda c, mode: mode == FORWARD and c.m == 1),
    ),
    notes=("'vs PEFT' = PEFT's time / time (> 1: faster); 'x base' = time / the quantized layer's alone",),
)


def settings(dtype: torch.dtype) -> dict[str, Any]:
    return {"dtype": str(dtype).removeprefix("torch."), "lora_alpha": f"{LORA_ALPHA_PER_RANK} x rank",
            "adapter_dtype": "float32", "quantization": "bitsandbytes: nf4-dq = NF4 + double quant, blocks of 64"}
