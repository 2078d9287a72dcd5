"""The multi-LoRA benchmark (issue 11): one base linear (K = N = ``hidden``), L adapters, each
token of x ``[T, K]`` with its own adapter; forward only (inference: PEFT's mixed batch refuses
training mode).

Rows (the same weights and ids):

- ``base``: ``F.linear(x, W, b)`` alone: the floor.
- ``peft``: HF PEFT's mixed batch: a ``lora.Linear`` with L adapters (``get_peft_model`` on a
  one-Linear module, then ``add_adapter``), called with ``adapter_names=`` one name per token.
- ``loop``: a per-adapter loop in plain PyTorch (PEFT's algorithm without its module overhead):
  for each adapter present, gather its tokens, two GEMMs, scatter-add.
- ``padded``: what vLLM does: every adapter padded to the largest rank, A and B gathered per
  token, two batched products (``bmm``) over the padded rank (vLLM's torch ``bgmv`` ops), in
  chunks of ``PADDED_CHUNK`` tokens to bound the gathered copies.
- ``torch`` / ``triton`` / ``cuda``: ``fastpeft.ops.multi_lora_linear`` with
  ``FASTPEFT_BACKEND`` forced: the torch path, the Triton kernels, the CUDA C++ decode kernel
  (its forward above the decode size is Triton's). The last two only on a GPU.

Cases: T tokens, hidden size, rank (``RANK`` for all, or ``MIXED`` ranks 8, 16, 32, 64 cycled
over the adapters), L adapters and their popularity: ``distinct`` (token t uses adapter
``t mod L``: every token in a group of L a different adapter), ``uniform`` (ids drawn uniformly)
and ``zipf`` (``P(i) ~ (i + 1)^-1.5``: a few popular adapters, a long tail).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft import backend, cuda_ext
from fastpeft.bench.cases import FORWARD
from fastpeft.bench.forced import forced_backend
from fastpeft.bench.implementations import LORA_ALPHA_PER_RANK
from fastpeft.bench.op_bench import OpRow, OpSpec, OpTarget, Ratio, Step, mode_step
from fastpeft.ops.multi_lora_linear import multi_lora_linear

BASE, PEFT, LOOP, PADDED, TORCH, TRITON, CUDA = "base", "peft", "loop", "padded", "torch", "triton", "cuda"
FASTPEFT_ROWS = (TORCH, TRITON, CUDA)
DISTINCT, UNIFORM, ZIPF = "distinct", "uniform", "zipf"
POPULARITIES = (DISTINCT, UNIFORM, ZIPF)
ZIPF_EXPONENT = 1.5
RANK = 16
MIXED = "8-64"
# The mixed ranks, cycled over the adapters: the spread of ranks served side by side.
MIXED_RANKS = (8, 16, 32, 64)
# Tokens per chunk of the padded row: 256 tokens x 64 x 4096 bf16 gathers 128 MiB of A (and
# of B) at a time, as fastpeft's per-token torch path chunks its gathers.
PADDED_CHUNK = 256


@dataclass(frozen=True)
class MultiLoRACase:
    """``t`` tokens through a ``hidden`` x ``hidden`` linear with ``adapters`` LoRA adapters of
    rank ``rank`` (an int, or ``MIXED``), tokens assigned by ``popularity``."""

    t: int
    hidden: int
    rank: int | str
    adapters: int
    popularity: str

    @property
    def label(self) -> str:
        return f"T={self.t} H={self.hidden} r={self.rank} L={self.adapters} {self.popularity}"

    def fields(self) -> dict[str, Any]:
        return {"T": self.t, "hidden": self.hidden, "r": self.rank, "L": self.adapters, "ids": self.popularity}

    def ranks(self) -> list[int]:
        if self.rank == MIXED:
            return [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(self.adapters)]
        return [int(self.rank)] * self.adapters


def grid(ts: tuple[int, ...], hidden: int, ranks: tuple[int | str, ...], adapters: tuple[int, ...],
         popularities: tuple[str, ...]) -> tuple[MultiLoRACase, ...]:
    """The cross product, less the duplicates: one adapter has one popularity and one rank."""
    cases = []
    for rank, count, popularity, t in itertools.product(ranks, adapters, popularities, ts):
        if count == 1 and (popularity != popularities[0] or rank == MIXED):
            continue
        cases.append(MultiLoRACase(t, hidden, rank, count, popularity))
    return tuple(cases)


# The grid: decode T in {1, 16, 64, 256}, prefill 4096, hidden 4096, r 16 and mixed.
GPU_CASES = grid((1, 16, 64, 256, 4096), 4096, (RANK, MIXED), (1, 8, 64), POPULARITIES)
# CPU: fp32 on two cores, a smaller hidden size, the decode-to-prefill-chunk range at r 16 and
# the mixed ranks at T = 64 (18 cases, about a minute).
CPU_CASES = (grid((1, 16, 64, 256), 1024, (RANK,), (8, 64), (DISTINCT, ZIPF))
             + grid((64,), 1024, (MIXED,), (64,), (DISTINCT, ZIPF)))
# --quick (CI): two decode batches over 8 adapters at a small hidden size.
QUICK_CASES = grid((16, 64), 256, (RANK,), (8,), (DISTINCT,))


def adapter_ids(case: MultiLoRACase, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """``[T]`` int64 slot ids following ``case.popularity``."""
    if case.popularity == DISTINCT:
        return (torch.arange(case.t) % case.adapters).to(device)
    if case.popularity == UNIFORM:
        weights = torch.ones(case.adapters)
    elif case.popularity == ZIPF:
        weights = (torch.arange(case.adapters) + 1.0) ** -ZIPF_EXPONENT
    else:
        raise ValueError(f"unknown popularity {case.popularity!r}; expected one of {POPULARITIES}")
    cpu = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=generator, device=device)))
    return torch.multinomial(weights, case.t, replacement=True, generator=cpu).to(device)


@dataclass(frozen=True)
class MultiLoRAProblem:
    """x ``[T, K]``, W ``[N, K]``, b ``[N]``; slots ``lora_a [L, R_max, K]``, ``lora_b [L, N,
    R_max]`` zero past each adapter's rank; ``scalings [L]`` (alpha / r), ``ranks [L]``,
    ``ids [T]``."""

    case: MultiLoRACase
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scalings: torch.Tensor
    ranks: torch.Tensor
    ids: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.x, self.weight, self.bias, self.lora_a, self.lora_b))

    def adapter(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter i's own ``A [r_i, K]`` and ``B [N, r_i]``."""
        r = int(self.ranks[i])
        return self.lora_a[i, :r], self.lora_b[i, :, :r]


def make_problem(case: MultiLoRACase, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> MultiLoRAProblem:
    """Random weights with a trained layer's scale (std ``1/sqrt(fan_in)``), B nonzero."""
    k = n = case.hidden
    ranks = case.ranks()
    r_max = max(ranks)

    def randn(*size: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) / fan_in**0.5).to(dtype)

    lora_a = torch.zeros(case.adapters, r_max, k, device=device, dtype=dtype)
    lora_b = torch.zeros(case.adapters, n, r_max, device=device, dtype=dtype)
    for i, r in enumerate(ranks):
        lora_a[i, :r] = randn(r, k, fan_in=k)
        lora_b[i, :, :r] = randn(n, r, fan_in=r)
    return MultiLoRAProblem(
        case, randn(case.t, k, fan_in=1), randn(n, k, fan_in=k), randn(n, fan_in=k), lora_a, lora_b,
        torch.full((case.adapters,), float(LORA_ALPHA_PER_RANK), device=device),
        torch.tensor(ranks, device=device), adapter_ids(case, device, generator),
    )


def _forward_row(forward_of):
    """A forward-only row: ``forward_of(problem)`` returns the zero-argument forward."""

    def build(p: MultiLoRAProblem, mode: str) -> Step:
        return mode_step(forward_of(p), mode, (), None)

    return build


def _base(p: MultiLoRAProblem):
    return lambda: F.linear(p.x, p.weight, p.bias)


def _loop(p: MultiLoRAProblem):
    adapters = [p.adapter(i) for i in range(p.case.adapters)]

    def forward() -> torch.Tensor:
        y = F.linear(p.x, p.weight, p.bias)
        for i in p.ids.unique().tolist():
            tokens = (p.ids == i).nonzero().squeeze(1)
            a, b = adapters[i]
            y.index_add_(0, tokens, F.linear(F.linear(p.x[tokens], a), b), alpha=float(p.scalings[i]))
        return y

    return forward


def _padded(p: MultiLoRAProblem):
    def forward() -> torch.Tensor:
        y = F.linear(p.x, p.weight, p.bias)
        for start in range(0, p.case.t, PADDED_CHUNK):
            ids = p.ids[start:start + PADDED_CHUNK]
            x = p.x[start:start + PADDED_CHUNK]
            shrunk = torch.bmm(p.lora_a[ids], x.unsqueeze(2))  # [C, R_max, 1]: padded rows are zeros
            expanded = torch.bmm(p.lora_b[ids], shrunk).squeeze(2)  # [C, N]
            y[start:start + PADDED_CHUNK] += expanded * p.scalings[ids].unsqueeze(1).to(y.dtype)
        return y

    return forward


def _fastpeft(choice: str):
    def forward_of(p: MultiLoRAProblem):
        def forward() -> torch.Tensor:
            with forced_backend(choice):
                return multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ids, p.ranks)

        return forward

    return forward_of


def peft_names(p: MultiLoRAProblem) -> list[str]:
    return [f"a{i}" for i in range(p.case.adapters)]


def _peft(p: MultiLoRAProblem):
    from peft import LoraConfig, get_peft_model

    class OneLinear(nn.Module):
        def __init__(self, proj: nn.Linear) -> None:
            super().__init__()
            self.proj = proj

    n, k = p.weight.shape
    with torch.device("meta"):  # no init work: the weights are replaced
        proj = nn.Linear(k, n)
    proj.weight, proj.bias = nn.Parameter(p.weight, requires_grad=False), nn.Parameter(p.bias, requires_grad=False)
    names = peft_names(p)
    ranks = p.case.ranks()

    def config(r: int) -> LoraConfig:
        return LoraConfig(r=r, lora_alpha=LORA_ALPHA_PER_RANK * r, target_modules=["proj"])

    model = get_peft_model(OneLinear(proj), config(ranks[0]), adapter_name=names[0], autocast_adapter_dtype=False)
    for name, r in zip(names[1:], ranks[1:]):
        model.add_adapter(name, config(r))
    layer = model.base_model.model.proj.to(p.x.dtype).eval()
    with torch.no_grad():
        for i, name in enumerate(names):
            a, b = p.adapter(i)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    token_names = [names[i] for i in p.ids.tolist()]
    return lambda: layer(p.x, adapter_names=token_names)


def _peft_unavailable(device: torch.device) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("peft") is not None else "peft is not installed"


def _kernel_unavailable(choice: str):
    def unavailable(device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs a CUDA device"
        if choice == TRITON and not backend.triton_available():
            return "the triton package is not installed"
        if choice == CUDA:
            try:
                cuda_ext.load()
            except RuntimeError as exc:  # not built, or no usable device: the reason
                return str(exc)
        return None

    return unavailable


ROWS: tuple[OpRow, ...] = (
    OpRow(BASE, "F.linear(x, W, b) alone: the floor", _forward_row(_base)),
    OpRow(PEFT, "HF PEFT lora.Linear with L adapters, mixed batch (adapter_names= one per token)",
          _forward_row(_peft), _peft_unavailable, capturable=False),
    OpRow(LOOP, "per-adapter loop in PyTorch: gather the adapter's tokens, two GEMMs, index_add_",
          _forward_row(_loop), capturable=False),
    OpRow(PADDED, "vLLM-style padded rank: every adapter padded to the largest rank, A and B gathered per token, "
                  f"two bmm (chunks of {PADDED_CHUNK} tokens)", _forward_row(_padded)),
    OpRow(TORCH, "fastpeft.ops.multi_lora_linear, FASTPEFT_BACKEND=torch (grouped torch path)",
          _forward_row(_fastpeft("torch"))),
    OpRow(TRITON, "fastpeft.ops.multi_lora_linear, FASTPEFT_BACKEND=triton (decode / segment kernels)",
          _forward_row(_fastpeft("triton")), _kernel_unavailable(TRITON)),
    OpRow(CUDA, "fastpeft.ops.multi_lora_linear, FASTPEFT_BACKEND=cuda (CUDA C++ decode kernel; Triton above "
                "decode sizes)", _forward_row(_fastpeft("cuda")), _kernel_unavailable(CUDA)),
)
ROW_NAMES = tuple(r.name for r in ROWS)

X_BASE = "x base"
VS_PEFT = "vs PEFT"
VS_LOOP = "vs loop"

SPEC = OpSpec(
    name="multi-lora",
    title="Multi-LoRA mixed batch (fastpeft.ops.multi_lora_linear), forward",
    make_problem=make_problem,
    rows=ROWS,
    modes=(FORWARD,),
    ratios=(Ratio(X_BASE, BASE, speedup=False), Ratio(VS_PEFT, PEFT, speedup=True),
            Ratio(VS_LOOP, LOOP, speedup=True)),
    metrics=(),
    targets=(
        OpTarget("<= 1.15x base linear at T=64, 64 distinct adapters, r 16 (H200)", X_BASE, 1.15, True,
                 FASTPEFT_ROWS, lambda c, mode: (c.t, c.adapters, c.popularity, c.rank) == (64, 64, DISTINCT, RANK)),
        OpTarget(">= 10x PEFT's mixed batch (H200)", VS_PEFT, 10.0, False, FASTPEFT_ROWS,
                 lambda c, mode: c.adapters > 1),
        OpTarget("faster than PEFT's mixed batch (CPU path, now)", VS_PEFT, 1.0, False, (TORCH,),
                 lambda c, mode: c.adapters > 1),
    ),
    notes=("'x base' = time / F.linear's; 'vs PEFT' / 'vs loop' = that row's time / time (> 1: faster)",),
)


def settings(dtype: torch.dtype) -> dict[str, Any]:
    return {"dtype": str(dtype).removeprefix("torch."), "lora_alpha": f"{LORA_ALPHA_PER_RANK} x rank",
            "mixed_ranks": list(MIXED_RANKS), "zipf_exponent": ZIPF_EXPONENT, "mode": "forward (inference)"}
