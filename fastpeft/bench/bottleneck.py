"""The bottleneck adapter benchmark (issue 10): ``out = h + scaling * (act(h W_down^T + b_down) W_up^T + b_up)``.

Rows (the same weights, h ``[M, D]``, bottleneck R, ReLU, scaling 1, no dropout):

- ``naive``: AdapterHub's module structure, written here (``AdapterHubAdapter``; the
  ``adapters`` library is not imported): ``adapter_down = Sequential(Linear(D, R), act)``,
  ``adapter_up = Linear(R, D)``, ``up * scaling``, dropout, ``+ residual``, as
  ``adapters.methods.modeling.Adapter.forward`` computes it: 4-5 kernels and several passes over h.
- ``compile``: ``torch.compile(dynamic=True)`` of that module's forward.
- ``torch`` / ``triton`` / ``cuda``: ``fastpeft.ops.bottleneck_adapter`` with ``backend=`` the
  torch path, the fused Triton kernels, the CUDA C++ kernels (the last two only on a GPU; the
  CUDA row only with ``fastpeft._C`` built).
- ``launch``: one tiny kernel (``x.add_(1)`` on one element), timed as the others, at M = 1 in
  the forward: the floor of the decode target.

Modes: forward (no grad) and forward+backward (grads of h, W_down, b_down, W_up, b_up against a
random dOut). Metrics: achieved bandwidth (minimum bytes moved / time) and, on a GPU whose peak
``roofline`` knows, its fraction of the peak. Minimum bytes: forward reads h and the weights and
writes out; forward+backward adds reading dOut, h and the weights again and writing dh and the
weight gradients (the ``[M, R]`` bottleneck is left out: R << D).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastpeft import backend, cuda_ext
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, MODES
from fastpeft.bench.implementations import COMPILE_RECOMPILE_LIMIT
from fastpeft.bench.op_bench import Metric, OpRow, OpSpec, OpTarget, Ratio, Step, mode_step
from fastpeft.bench.roofline import achieved_gb_s, fraction_of_peak
from fastpeft.bench.spread import Spread
from fastpeft.ops.bottleneck_adapter import bottleneck_adapter

NAIVE, COMPILE, TORCH, TRITON, CUDA, LAUNCH = "naive", "compile", "torch", "triton", "cuda", "launch"
FASTPEFT_ROWS = (TORCH, TRITON, CUDA)
# AdapterHub's default non-linearity for its bottleneck configs (seq_bn, double_seq_bn, par_bn).
ACTIVATION = "relu"
SCALING = 1.0


@dataclass(frozen=True)
class BottleneckCase:
    """h ``[m, d]`` through a bottleneck of width ``r``."""

    m: int
    d: int
    r: int

    @property
    def label(self) -> str:
        return f"M={self.m} D={self.d} R={self.r}"

    def fields(self) -> dict[str, Any]:
        return {"M": self.m, "D": self.d, "R": self.r}


def grid(ms: tuple[int, ...], ds: tuple[int, ...], rs: tuple[int, ...]) -> tuple[BottleneckCase, ...]:
    return tuple(BottleneckCase(m, d, r) for d, r, m in itertools.product(ds, rs, ms))


# The grid: decode (1), a prefill chunk (512), a training batch (8192); BERT-base and
# Llama-7B hidden sizes; reduction factors of 48-256.
GPU_CASES = grid((1, 512, 8192), (768, 4096), (16, 64))
# CPU: the same M and D at bottleneck 64 (the target's), fp32 on two cores in about a minute.
CPU_CASES = grid((1, 512, 8192), (768, 4096), (64,))
# --quick (CI): a decode and a small batch at BERT-base width.
QUICK_CASES = grid((1, 256), (768,), (16,))


@dataclass(frozen=True)
class BottleneckProblem:
    """Leaves h ``[M, D]`` and the adapter (requiring grad), and dOut ``[M, D]``."""

    case: BottleneckCase
    h: torch.Tensor
    w_down: torch.Tensor
    b_down: torch.Tensor
    w_up: torch.Tensor
    b_up: torch.Tensor
    grad_out: torch.Tensor

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.w_down, self.b_down, self.w_up, self.b_up)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.h, self.grad_out, *self.params))


def make_problem(case: BottleneckCase, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> BottleneckProblem:
    """Random h and dOut, and weights with a trained adapter's scale (std ``1/sqrt(fan_in)``)."""

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_()

    d, r = case.d, case.r
    return BottleneckProblem(
        case, randn(case.m, d), randn(r, d, scale=d**-0.5), randn(r, scale=d**-0.5), randn(d, r, scale=r**-0.5),
        randn(d, scale=r**-0.5), randn(case.m, d).detach(),
    )


class AdapterHubAdapter(nn.Module):
    """AdapterHub's bottleneck ``Adapter`` module's structure and forward (``adapters`` 1.3.0,
    ``methods/modeling.py``; no layer norms, gating or PHM: the seq_bn / par_bn defaults):
    ``adapter_down`` (Linear D -> R, then the activation), ``adapter_up`` (Linear R -> D),
    ``up * scaling``, dropout, then ``+ residual_input``. Returns only the output (AdapterHub's
    also returns the intermediate ``down`` and ``up``)."""

    def __init__(self, d: int, r: int, non_linearity: str = ACTIVATION, scaling: float = SCALING,
                 dropout: float = 0.0) -> None:
        super().__init__()
        activation = {"relu": nn.ReLU(), "gelu": nn.GELU(), "swish": nn.SiLU(), "silu": nn.SiLU()}[non_linearity]
        self.adapter_down = nn.Sequential(nn.Linear(d, r), activation)
        self.adapter_up = nn.Linear(r, d)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual_input: torch.Tensor) -> torch.Tensor:
        down = self.adapter_down(x)
        up = self.adapter_up(down)
        up = up * self.scaling
        output = self.dropout(up)
        return output + residual_input

    @classmethod
    def sharing(cls, p: BottleneckProblem) -> AdapterHubAdapter:
        """The module with the problem's weights as its parameters (the same storage and leaves)."""
        with torch.device("meta"):  # no init work: every parameter is replaced
            module = cls(p.case.d, p.case.r)
        module.adapter_down[0].weight, module.adapter_down[0].bias = nn.Parameter(p.w_down), nn.Parameter(p.b_down)
        module.adapter_up.weight, module.adapter_up.bias = nn.Parameter(p.w_up), nn.Parameter(p.b_up)
        return module


def _adapter_forward(module: AdapterHubAdapter, h: torch.Tensor) -> torch.Tensor:
    """The module applied as a Pfeiffer adapter: its input is its residual."""
    return module(h, h)


@functools.cache
def _compiled_adapter_forward():
    # One compiled function for the run, dynamic in every size (see implementations'
    # _compiled_lora_linear_ref for the recompile limit).
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, COMPILE_RECOMPILE_LIMIT)
    return torch.compile(_adapter_forward, dynamic=True)


def _module_row(compiled: bool):
    def build(p: BottleneckProblem, mode: str) -> Step:
        module = AdapterHubAdapter.sharing(p)
        forward = _compiled_adapter_forward() if compiled else _adapter_forward
        return mode_step(lambda: forward(module, p.h), mode, (p.h, *module.parameters()), p.grad_out)

    return build


def _op_row(choice: str):
    def build(p: BottleneckProblem, mode: str) -> Step:
        def forward() -> torch.Tensor:
            return bottleneck_adapter(p.h, *p.params[:2], *p.params[2:], ACTIVATION, SCALING, backend=choice)

        return mode_step(forward, mode, (p.h, *p.params), p.grad_out)

    return build


def _launch_row(p: BottleneckProblem, mode: str) -> Step:
    one = torch.zeros(1, device=p.h.device)
    return lambda: one.add_(1)


def _triton_unavailable(device: torch.device) -> str | None:
    if not backend.triton_available():
        return "the triton package is not installed"
    if not backend.use_triton(device, "triton"):
        return "needs a CUDA device (CPU tensors take the kernels only under TRITON_INTERPRET)"
    return None


def _cuda_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    try:
        cuda_ext.load()
    except RuntimeError as exc:  # not built, or no device it can use: the reason
        return str(exc)
    return None


def bytes_moved(case: BottleneckCase, mode: str, element_size: int) -> int:
    """Minimum bytes (see the module docstring) for elements of ``element_size`` bytes."""
    activations = case.m * case.d * element_size
    weights = (2 * case.d * case.r + case.r + case.d) * element_size
    forward = 2 * activations + weights  # h read, out written, weights read
    if mode == FORWARD:
        return forward
    return forward + 3 * activations + 2 * weights  # dOut and h read, dh written; weights read, grads written


def _bandwidth(case: BottleneckCase, mode: str, row: str, ms: Spread, settings: dict[str, Any]) -> Spread | None:
    if row == LAUNCH:
        return None
    return achieved_gb_s(bytes_moved(case, mode, settings["element_size"]), ms)


def _roofline(case: BottleneckCase, mode: str, row: str, ms: Spread, settings: dict[str, Any]) -> Spread | None:
    peak = settings.get("peak_bandwidth_gb_s")
    gb_s = _bandwidth(case, mode, row, ms, settings)
    return None if peak is None or gb_s is None else fraction_of_peak(gb_s, peak)


ROWS: tuple[OpRow, ...] = (
    OpRow(NAIVE, "AdapterHub's Adapter module structure in plain PyTorch: Linear down, ReLU, Linear up, "
                 "scale, residual add", _module_row(compiled=False)),
    OpRow(COMPILE, "torch.compile(dynamic=True) of that module", _module_row(compiled=True), compiles=True),
    OpRow(TORCH, "fastpeft.ops.bottleneck_adapter, torch path", _op_row("torch")),
    OpRow(TRITON, "fastpeft.ops.bottleneck_adapter, fused Triton kernels", _op_row("triton"), _triton_unavailable),
    OpRow(CUDA, "fastpeft.ops.bottleneck_adapter, CUDA C++ kernels (fastpeft._C)", _op_row("cuda"),
          _cuda_unavailable),
    OpRow(LAUNCH, "one launch of a one-element kernel: the decode floor", _launch_row,
          applies=lambda case, mode: case.m == 1 and mode == FORWARD),
)
ROW_NAMES = tuple(r.name for r in ROWS)

VS_NAIVE = "vs naive"
X_LAUNCH = "x launch"
GB_S = "GB/s"
ROOFLINE = "of HBM peak"

SPEC = OpSpec(
    name="bottleneck",
    title="Bottleneck adapter (fastpeft.ops.bottleneck_adapter)",
    make_problem=make_problem,
    rows=ROWS,
    modes=MODES,
    ratios=(Ratio(VS_NAIVE, NAIVE, speedup=True), Ratio(X_LAUNCH, LAUNCH, speedup=False)),
    metrics=(Metric(GB_S, _bandwidth, "{:.4g}".format), Metric(ROOFLINE, _roofline, "{:.0%}".format)),
    targets=(
        OpTarget(">= 2x naive fwd+bwd at M=8192, D=4096, R=64 (H200)", VS_NAIVE, 2.0, False, FASTPEFT_ROWS,
                 lambda c, mode: mode == FORWARD_BACKWARD and (c.m, c.d, c.r) == (8192, 4096, 64)),
        OpTarget(">= 70% of HBM peak bandwidth in the forward at M=8192 (H200)", ROOFLINE, 0.70, False,
                 FASTPEFT_ROWS, lambda c, mode: mode == FORWARD and c.m == 8192),
        OpTarget("decode (M=1) forward <= 1.2x one launch (H200)", X_LAUNCH, 1.2, True, FASTPEFT_ROWS,
                 lambda c, mode: mode == FORWARD and c.m == 1),
        OpTarget("torch path no slower than naive, every cell", VS_NAIVE, 1.0, False, (TORCH,),
                 lambda c, mode: True),
    ),
    notes=("'vs naive' = naive time / time (> 1: faster); 'x launch' = time / one kernel launch's; GB/s = minimum "
           "bytes moved (h and out, dOut and dh in fwd+bwd, weights) / time",),
)


def settings(device: torch.device, dtype: torch.dtype, peak_gb_s: float | None) -> dict[str, Any]:
    """What the rows run on, for reports (the metrics read ``element_size`` and the peak)."""
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "element_size": torch.empty(0, dtype=dtype).element_size(),
        "activation": ACTIVATION,
        "scaling": SCALING,
        "dropout": 0.0,
        "peak_bandwidth_gb_s": peak_gb_s,
        "peak_source": "fastpeft.bench.roofline.PEAK_BANDWIDTH_GB_S (datasheets)" if peak_gb_s else "unknown device",
        "device": device.type,
    }
