"""The problems a plan covers (the key shapes of issue 19), with the least memory traffic and
the FLOPs each needs whatever the implementation.

Shapes (Llama-3-8B; bf16 activations):

- ``lora``: x ``[M, K]`` through W ``[N, K]`` with a rank-r adapter, K = N = 4096 (q/o) and
  4096 -> 14336 (gate/up), M = 1 (decode) to 16384 (training batches), r = 8, 16, 64; fp32
  adapters (PEFT's default on a bf16 model). ``fwd``: inference (no dropout); ``fwd+bwd``:
  a training step as ``fastpeft bench --focused`` times it (dropout 0.05, gradients of x, A
  and B; W frozen, no bias).
- ``bottleneck``: h ``[M, D]``, D = 4096, bottleneck R = 64 and 256, bf16 weights with biases,
  relu, the residual h (AdapterHub's seq_bn); ``fwd`` and ``fwd+bwd`` (every gradient but
  the scaling's, no dropout).
- ``qlora``: LoRA's shapes, M = 1 to 4096, r = 16, on bitsandbytes' NF4 weight with double
  quantization (QLoRA's recipe: blocks of 64, the block scales 8-bit in blocks of 256), bf16
  compute dtype and activations, fp32 adapters; ``fwd`` and ``fwd+bwd`` as LoRA's. The weight's
  bytes are the packed codes (N K / 2), one 8-bit scale code per block, the nested fp32 scales
  and the two code tables.
- ``multi-lora``: T = 1, 16, 64 tokens through a 4096 x 4096 linear with 64 loaded adapters
  of rank 16 (bf16 slots), each token its own adapter (distinct ids, the serving worst
  case); ``fwd`` only (serving).

``min_bytes``: every input read once, every output written once (no re-reads, nothing
materialized between passes; a training step's forward and backward each read their
inputs). ``flops``: the products' multiply-adds x 2 at the problem's sizes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

LORA, QLORA, BOTTLENECK, MULTI_LORA = "lora", "qlora", "bottleneck", "multi-lora"
OPS = (LORA, QLORA, BOTTLENECK, MULTI_LORA)
FWD, FWD_BWD = "fwd", "fwd+bwd"
MODES = (FWD, FWD_BWD)

# Llama-3-8B: hidden 4096, MLP 14336; (K, N) of q/o and gate/up.
LORA_SHAPES = ((4096, 4096), (4096, 14336))
# Decode (1, 16), small and prefill batches (64, 512), training batches (4096, 16384).
LORA_MS = (1, 16, 64, 512, 4096, 16384)
# The range of ranks: the smallest, the benchmark's (16) and the largest the kernels take.
LORA_RANKS = (8, 16, 64)
# Dropout of the training step: the focused benchmark's (``fastpeft.bench.focused.DROPOUT``).
LORA_TRAIN_DROPOUT = 0.05
# QLoRA: LoRA's shapes from decode to a training batch, the benchmark's rank; bitsandbytes'
# defaults for NF4 with double quantization (4-bit blocks of 64, scale blocks of 256).
QLORA_MS = (1, 16, 64, 512, 4096)
QLORA_RANK = 16
QLORA_BLOCKSIZE = 64
QLORA_NESTED_BLOCKSIZE = 256
# The 4-bit code table (16 fp32 values) and the scales' 8-bit code table (256 fp32 values).
QLORA_CODE_BYTES = (16 + 256) * 4
# AdapterHub width of a Llama-7B/8B model and bottlenecks of reduction factor 64 and 16.
BOTTLENECK_D = 4096
BOTTLENECK_RANKS = (64, 256)
# LoRA's Ms plus 8192, the bottleneck targets' training batch (fastpeft.bench.bottleneck).
BOTTLENECK_MS = (1, 16, 64, 512, 4096, 8192, 16384)
MULTI_LORA_HIDDEN = 4096
MULTI_LORA_TOKENS = (1, 16, 64)
MULTI_LORA_ADAPTERS = 64
MULTI_LORA_RANK = 16


@dataclass(frozen=True)
class Problem:
    """One op call: ``m`` rows (tokens) of width ``k`` to width ``n`` (``n == k`` for the
    bottleneck adapter, D), rank ``r``, ``adapters`` slots (multi-LoRA only), in ``mode``."""

    op: str
    mode: str
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    adapters: int | None = None

    @property
    def e(self) -> int:
        return self.dtype.itemsize

    @property
    def ea(self) -> int:
        return self.adapter_dtype.itemsize

    def weight_bytes(self) -> int:
        """Bytes of the base weight: ``N K`` elements, or (QLoRA) the NF4 weight's packed codes
        and scales (module docstring)."""
        if self.op != QLORA:
            return self.n * self.k * self.e
        blocks = -(-self.n * self.k // QLORA_BLOCKSIZE)
        return self.n * self.k // 2 + blocks + 4 * -(-blocks // QLORA_NESTED_BLOCKSIZE) + QLORA_CODE_BYTES

    def min_bytes(self) -> int:
        """Bytes every implementation must move (module docstring)."""
        m, k, n, r, e, ea = self.m, self.k, self.n, self.r, self.e, self.ea
        if self.op in (LORA, QLORA):
            adapter = (r * k + n * r) * ea
            w = self.weight_bytes()
            forward = (m * k + m * n) * e + w + adapter
            if self.mode == FWD:
                return forward
            s = m * r * 4  # the forward's saved fp32 x A^T
            # backward: dY, x, W, A, B, s read; dX, dA, dB written
            return forward + s + (m * n + 2 * m * k) * e + w + 2 * adapter + s
        if self.op == BOTTLENECK:
            weights = (2 * r * k + r + k) * ea
            forward = 2 * m * k * e + weights
            if self.mode == FWD:
                return forward
            z = m * r * 4  # the forward's saved fp32 pre-activation
            # backward: dOut, h, both weights, z read; dh and every weight gradient written
            return forward + z + 3 * m * k * e + z + 2 * weights
        used = min(self.m, self.adapters or 0)  # distinct ids: one adapter per token
        return (m * k + n * k + m * n) * e + used * (r * k + n * r) * ea

    def flops(self) -> int:
        m, k, n, r = self.m, self.k, self.n, self.r
        if self.op in (LORA, QLORA):
            forward = 2 * m * n * k + 2 * m * k * r + 2 * m * n * r
            # backward: dX = dY W + dS A, dS = dY B, dA = dS^T x, dB = dY^T s
            return forward if self.mode == FWD else forward + 2 * m * n * k + 4 * m * k * r + 4 * m * n * r
        if self.op == BOTTLENECK:
            forward = 4 * m * k * r
            # backward: dY W_up, dW_up, dW_down, dh
            return forward if self.mode == FWD else forward + 8 * m * k * r
        return 2 * m * n * k + 2 * m * k * r + 2 * m * n * r


def problems(ops: tuple[str, ...] = OPS, modes: tuple[str, ...] = MODES) -> list[Problem]:
    """The issue's key shapes for ``ops`` in ``modes`` (multi-LoRA: forward only)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    out: list[Problem] = []
    for mode in modes:
        if LORA in ops:
            for (k, n), r, m in itertools.product(LORA_SHAPES, LORA_RANKS, LORA_MS):
                out.append(Problem(LORA, mode, m, k, n, r, bf16, fp32))
        if QLORA in ops:
            for (k, n), m in itertools.product(LORA_SHAPES, QLORA_MS):
                out.append(Problem(QLORA, mode, m, k, n, QLORA_RANK, bf16, fp32))
        if BOTTLENECK in ops:
            for r, m in itertools.product(BOTTLENECK_RANKS, BOTTLENECK_MS):
                out.append(Problem(BOTTLENECK, mode, m, BOTTLENECK_D, BOTTLENECK_D, r, bf16, bf16))
        if MULTI_LORA in ops and mode == FWD:
            for t in MULTI_LORA_TOKENS:
                out.append(Problem(MULTI_LORA, mode, t, MULTI_LORA_HIDDEN, MULTI_LORA_HIDDEN, MULTI_LORA_RANK, bf16,
                                   bf16, MULTI_LORA_ADAPTERS))
    return out
