"""What the benchmark measures: layer shapes, token counts M, LoRA ranks r, modes, FLOPs.

Shapes are Llama-3-8B's projections. A case is one (shape, M, r): x ``[M, K]``,
W ``[N, K]``, A ``[r, K]``, B ``[N, r]``, y ``[M, N]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    """A linear layer ``in_features`` (K) -> ``out_features`` (N)."""

    name: str
    in_features: int
    out_features: int


LLAMA3_8B_SHAPES: tuple[LayerShape, ...] = (
    LayerShape("q/o", 4096, 4096),
    LayerShape("k/v", 4096, 1024),
    LayerShape("gate/up", 4096, 14336),
    LayerShape("down", 14336, 4096),
)
SHAPES_BY_NAME: dict[str, LayerShape] = {shape.name: shape for shape in LLAMA3_8B_SHAPES}

FORWARD = "fwd"
FORWARD_BACKWARD = "fwd+bwd"
MODES: tuple[str, ...] = (FORWARD, FORWARD_BACKWARD)


@dataclass(frozen=True)
class BenchCase:
    """One problem: x ``[m, shape.in_features]`` through a rank-``r`` LoRA layer."""

    shape: LayerShape
    m: int
    r: int

    @property
    def label(self) -> str:
        return f"{self.shape.name} M={self.m} r={self.r}"


@dataclass(frozen=True)
class CaseGrid:
    """The cross product shapes x M x r, run rank by rank (a run cut short by a time limit
    then has the first rank for every shape and M)."""

    shapes: tuple[LayerShape, ...]
    ms: tuple[int, ...]
    ranks: tuple[int, ...]

    def cases(self) -> list[BenchCase]:
        return [BenchCase(s, m, r) for r, s, m in itertools.product(self.ranks, self.shapes, self.ms)]


# The GPU grid: decode (1, 16), a prefill chunk (512) and training batches (4096, 8192);
# rank 16, the most common, first.
GPU_GRID = CaseGrid(LLAMA3_8B_SHAPES, (1, 16, 512, 4096, 8192), (16, 8, 64))
# Two cores do ~60-100 GFLOP/s in fp32: the two smaller shapes, decode-to-small-batch M and
# the most common rank keep the default CPU run (torch.compile included) under two minutes.
CPU_GRID = CaseGrid(
    (SHAPES_BY_NAME["q/o"], SHAPES_BY_NAME["k/v"]), (1, 16, 128), (16,)
)
# A smoke run: the smallest shape, one M, one rank.
QUICK_GRID = CaseGrid((SHAPES_BY_NAME["k/v"],), (16,), (8,))


def lora_flops(m: int, n: int, k: int, r: int, mode: str) -> int:
    """FLOPs of the LoRA linear (``r = 0``: the plain linear) in ``mode``.

    Forward: ``2MNK + 2MKr + 2MNr``. Backward runs only the GEMMs for the grads needed
    (x, A, B; W frozen), each counted at 2 FLOPs per multiply-add:
    ``dx = dy W`` (2MNK), ``ds = dy B`` (2MNr), ``dx += ds A`` (2MrK),
    ``dA = ds^T x_hat`` (2MrK), ``dB = dy^T s`` (2MNr).
    """
    forward = 2 * m * n * k + 2 * m * k * r + 2 * m * n * r
    if mode == FORWARD:
        return forward
    if mode == FORWARD_BACKWARD:
        backward = 2 * m * n * k + 4 * m * n * r + 4 * m * k * r
        return forward + backward
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
