"""The implementations a plan costs per problem, and who picks each.

For every ``fastpeft.plan.problems.Problem`` a ``PathRun`` per implementation: its name, the
settings that choose it (``choice``), and a function that runs its code on meta tensors
inside ``fastpeft.plan.recording.recording`` -- the launchers and torch paths the ops call,
with the ops' own glue between them (torch path or launcher, forward then backward).

Choices: ``auto`` (what ``FASTPEFT_BACKEND=auto`` runs on CUDA today), ``validated`` (what
``auto`` runs once ``fastpeft.backend.KERNELS_VALIDATED_ON_GPU`` is set: for LoRA, the shipped
dispatch table's pick, ``fastpeft.kernels.lora.dispatch.lookup``), and the forced backends
``torch``, ``triton``, ``hybrid``, and ``tma`` (``FASTPEFT_BACKEND=triton`` with
``FASTPEFT_LORA_TMA=1``). While the kernels are not validated, ``auto`` is the torch
path for every op.

Paths: ``torch`` (the ops' torch path, on the GPU through cuBLAS and aten kernels),
``fused`` and ``hybrid`` (LoRA's Triton paths), ``fused-tma`` (``fused`` with the sm_90 TMA
forward GEMM: planned on sm_90 GPUs at M above ``MEDIUM_MAX_M``, where its plan replaces the
forward's GEMM, as the focused benchmark times it), ``triton`` (the bottleneck adapter's and
multi-LoRA's Triton kernels); the dispatch table picks one implementation for both passes of
a training step. The CUDA C++
kernels (``FASTPEFT_BACKEND=cuda``) are not planned: their launches are not Python calls the
recording can see.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpeft import backend
from fastpeft.kernels.bottleneck import launch as bottleneck_launch
from fastpeft.kernels.lora import dispatch, hybrid_launch, launch as lora_launch
from fastpeft.kernels.lora.configs import MAX_RANK, MEDIUM_MAX_M
from fastpeft.kernels.multi_lora import configs as multi_lora_configs, launch as multi_lora_launch
from fastpeft.kernels.quant import launch as quant_launch, ref as quant_ref
from fastpeft.kernels.quant.bitsandbytes_ops import bitsandbytes_dequantize_4bit
from fastpeft.ops.bottleneck_adapter_torch import bottleneck_backward_torch, bottleneck_forward_torch
from fastpeft.ops.dropout import saved_or_redrawn_mask
from fastpeft.ops.lora_linear_torch import lora_backward_torch, lora_forward_torch, lora_rank_side
from fastpeft.ops.multi_lora_linear_torch import multi_lora_add_torch
from fastpeft.plan.gpus import GpuSpec
from fastpeft.plan.problems import (
    BOTTLENECK,
    FWD_BWD,
    LORA,
    LORA_TRAIN_DROPOUT,
    QLORA,
    QLORA_BLOCKSIZE,
    QLORA_NESTED_BLOCKSIZE,
    Problem,
)

AUTO, VALIDATED = "auto", "validated"
TORCH, FUSED, FUSED_TMA, HYBRID, TRITON = "torch", dispatch.FUSED, dispatch.FUSED_TMA, "hybrid", "triton"
# The forced setting that runs fused-tma: FASTPEFT_BACKEND=triton, FASTPEFT_LORA_TMA=1.
TMA = "tma"
# Every path a plan row can have.
PATH_NAMES = (TORCH, FUSED, FUSED_TMA, HYBRID, TRITON)
# The values do not change any launch (they are kernel arguments, not shapes); PEFT's usual
# lora_alpha = 2 r, AdapterHub's seq_bn defaults.
LORA_SCALING = 2.0
BOTTLENECK_ACTIVATION = "relu"
BOTTLENECK_SCALING = 1.0
# The bottleneck training step's gradients: h, W_down, b_down, W_up, b_up, not the scaling.
BOTTLENECK_NEEDS = (True, True, True, True, True, False)

# The planned tensors: meta (shapes, dtypes and strides, no data; see
# fastpeft.plan.recording for why they plan what CUDA tensors would run).
_META = torch.device("meta")


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=_META)


def _seed() -> torch.Tensor:
    return _meta(1, dtype=torch.int64)


@dataclass(frozen=True)
class PathRun:
    """An implementation of a problem: ``path``, the settings that pick it, and ``run``, which
    makes its launches on meta tensors (call it inside ``recording``, with ``backend`` forced)."""

    path: str
    choice: tuple[str, ...]
    run: Callable[[], None]
    # FASTPEFT_BACKEND while it runs: the torch paths read it (the launchers do not).
    backend: str | None = None


def _torch_choice() -> tuple[str, ...]:
    return (TORCH,) if backend.KERNELS_VALIDATED_ON_GPU else (TORCH, AUTO)


def _validated_choice() -> tuple[str, ...]:
    return (VALIDATED, AUTO) if backend.KERNELS_VALIDATED_ON_GPU else (VALIDATED,)


# --- LoRA ------------------------------------------------------------------------------

_LORA_FORWARD = {FUSED: lora_launch.lora_forward, FUSED_TMA: functools.partial(lora_launch.lora_forward, tma=True),
                 HYBRID: hybrid_launch.hybrid_forward}
_LORA_BACKWARD = {FUSED: lora_launch.lora_backward, FUSED_TMA: lora_launch.lora_backward,
                  HYBRID: hybrid_launch.hybrid_backward}


def _lora_run(p: Problem, path: str) -> Callable[[], None]:
    """The LoRA op's forward (and backward) on implementation ``path``, as
    ``fastpeft.ops.lora_linear`` calls them for 2-D x."""

    def run() -> None:
        dropout = LORA_TRAIN_DROPOUT if p.mode == FWD_BWD else 0.0
        x, w = _meta(p.m, p.k, dtype=p.dtype), _meta(p.n, p.k, dtype=p.dtype)
        a, b = _meta(p.r, p.k, dtype=p.adapter_dtype), _meta(p.n, p.r, dtype=p.adapter_dtype)
        seed = _seed()
        keep = x.new_empty(0, dtype=torch.bool)
        if path == TORCH:
            _, s, keep = lora_forward_torch(x, w, None, a, b, LORA_SCALING, dropout, seed)
        else:
            _, s = _LORA_FORWARD[path](x, w, None, a, b, LORA_SCALING, dropout, seed)
        if p.mode != FWD_BWD:
            return
        grad_y = _meta(p.m, p.n, dtype=p.dtype)
        if path == TORCH:
            keep = saved_or_redrawn_mask(keep, x, dropout, seed)
            lora_backward_torch(grad_y, x, w, a, b, s, keep, LORA_SCALING, dropout, True, True, True)
        else:
            _LORA_BACKWARD[path](grad_y, x, w, a, b, s, LORA_SCALING, dropout, seed, True, True, True)

    return run


def lora_table_choice(p: Problem, gpu: GpuSpec) -> str:
    """The implementation the shipped dispatch table picks for ``p`` on ``gpu``: the inference
    entry's in ``fwd`` mode, the training step's (both passes) in ``fwd+bwd``."""
    mode = dispatch.TRAINING if p.mode == FWD_BWD else dispatch.INFERENCE
    entry = dispatch.lookup(dispatch.shipped_table(), arch=f"sm_{gpu.capability}", dtype=p.dtype, mode=mode,
                            m=p.m, n=p.n, k=p.k)
    return entry["implementation"]


def lora_paths(p: Problem, gpu: GpuSpec) -> list[PathRun]:
    if p.r > MAX_RANK:  # the op sends larger ranks to the torch path whatever the backend
        return [PathRun(TORCH, (TORCH, AUTO, VALIDATED), _lora_run(p, TORCH), TORCH)]
    # (path, the forced setting that runs it, FASTPEFT_BACKEND meanwhile)
    implementations = [(TORCH, TORCH, TORCH), (FUSED, TRITON, TRITON), (HYBRID, HYBRID, HYBRID)]
    if gpu.capability >= 90 and p.m > MEDIUM_MAX_M:
        implementations.insert(2, (FUSED_TMA, TMA, TRITON))
    table = lora_table_choice(p, gpu)
    if table == FUSED_TMA and FUSED_TMA not in (path for path, _, _ in implementations):
        table = FUSED  # its plan would not use the TMA kernel here: the op runs fused's kernels
    runs = []
    for path, forced, backend_name in implementations:
        choice = _torch_choice() if path == TORCH else (forced,)
        if table == path:
            choice = (*choice, *_validated_choice())
        runs.append(PathRun(path, choice, _lora_run(p, path), backend_name))
    return runs


# --- QLoRA ------------------------------------------------------------------------------


def _nf4_weight(p: Problem) -> tuple:
    """The QLoRA op's weight arguments for NF4 with double quantization on meta tensors:
    (quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
    nested_blocksize), as bitsandbytes stores them."""
    blocks = -(-p.n * p.k // QLORA_BLOCKSIZE)
    return (quant_ref.NF4, _meta(p.n * p.k // 2, 1, dtype=torch.uint8), _meta(blocks, dtype=torch.uint8),
            _meta(16, dtype=torch.float32), _meta(-(-blocks // QLORA_NESTED_BLOCKSIZE), dtype=torch.float32),
            _meta(256, dtype=torch.float32), _meta(1, dtype=torch.float32), QLORA_BLOCKSIZE, QLORA_NESTED_BLOCKSIZE)


def _torch_path_dequantize(quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                           nested_blocksize, shape, dtype) -> torch.Tensor:
    """The QLoRA op's torch-path dequantization on CUDA: bitsandbytes' own kernels
    (``fastpeft.kernels.quant.bitsandbytes_ops``; recorded as its ops), or ``ref``'s torch ops
    where bitsandbytes is not installed (then the plan shows what the op would run without it)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return quant_ref.dequantize(quant_type, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                                    nested_blocksize, shape, dtype)
    importlib.import_module("bitsandbytes")  # registers its ops (and their fake kernels for meta tensors)
    return bitsandbytes_dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                        nested_blocksize, quant_type, shape, dtype)


def _qlora_run(p: Problem, lora_path: str) -> Callable[[], None]:
    """The QLoRA op (``fastpeft.ops.qlora_linear``) for 2-D x in its compute dtype, on the torch
    path (``lora_path`` torch: ``_torch_path_dequantize``, then the LoRA op's torch path with
    bitsandbytes' base gradient) or the kernels: the fused decode kernel where it takes the
    forward, else the one-launch dequantization and the LoRA op's ``lora_path``; the backward
    dequantizes in one launch and runs ``lora_path``'s backward."""

    def run() -> None:
        dropout = LORA_TRAIN_DROPOUT if p.mode == FWD_BWD else 0.0
        weight = _nf4_weight(p)
        x = _meta(p.m, p.k, dtype=p.dtype)
        a, b = _meta(p.r, p.k, dtype=p.adapter_dtype), _meta(p.n, p.r, dtype=p.adapter_dtype)
        seed = _seed()
        kernels = lora_path != TORCH
        dequantize = quant_launch.dequantize if kernels else _torch_path_dequantize
        keep = x.new_empty(0, dtype=torch.bool)
        if kernels and quant_launch.decode_fits(p.m, p.n, p.k, p.r, p.dtype, p.adapter_dtype, torch.device("cuda")):
            # the op's torch-ops mask with the kernels in use: the Triton mask kernel's Philox draw
            keep = lora_launch.dropout_keep_mask(seed, p.m, p.k, dropout) if dropout else keep
            s = lora_rank_side(x, a, dropout, keep)
            quant_launch.decode_forward(x, *weight, None, (s * LORA_SCALING).to(b.dtype), b)
        elif kernels:
            w = dequantize(*weight, (p.n, p.k), p.dtype)
            _, s = _LORA_FORWARD[lora_path](x, w, None, a, b, LORA_SCALING, dropout, seed)
        else:
            w = dequantize(*weight, (p.n, p.k), p.dtype)
            _, s, keep = lora_forward_torch(x, w, None, a, b, LORA_SCALING, dropout, seed)
        if p.mode != FWD_BWD:
            return
        grad_y = _meta(p.m, p.n, dtype=p.dtype)
        w = dequantize(*weight, (p.n, p.k), p.dtype)
        if kernels:
            _LORA_BACKWARD[lora_path](grad_y, x, w, a, b, s, LORA_SCALING, dropout, seed, True, True, True)
        else:
            keep = saved_or_redrawn_mask(keep, x, dropout, seed)
            lora_backward_torch(grad_y, x, None, a, b, s, keep, LORA_SCALING, dropout, True, True, True, grad_y @ w)

    return run


def qlora_paths(p: Problem, gpu: GpuSpec) -> list[PathRun]:
    """The torch path, and the kernels with the LoRA part the shipped dispatch table picks for
    the same LoRA problem (``triton``: the decode kernel's forward, or the one-launch
    dequantization feeding that LoRA path)."""
    lora_part = lora_table_choice(dataclasses.replace(p, op=LORA), gpu)
    if lora_part == FUSED_TMA and not (gpu.capability >= 90 and p.m > MEDIUM_MAX_M):
        lora_part = FUSED
    return [PathRun(TORCH, _torch_choice(), _qlora_run(p, TORCH), TORCH),
            PathRun(TRITON, (TRITON, *_validated_choice()), _qlora_run(p, lora_part), TRITON)]


# --- Bottleneck adapter ------------------------------------------------------------------


def _bottleneck_run(p: Problem, kernels: bool) -> Callable[[], None]:
    """The bottleneck op's forward (and backward), torch path or Triton launchers, for 2-D h
    and the residual h."""

    def run() -> None:
        h = _meta(p.m, p.k, dtype=p.dtype)
        w_down, w_up = _meta(p.r, p.k, dtype=p.adapter_dtype), _meta(p.k, p.r, dtype=p.adapter_dtype)
        b_down, b_up = _meta(p.r, dtype=p.adapter_dtype), _meta(p.k, dtype=p.adapter_dtype)
        args = (h, w_down, b_down, w_up, b_up, None, BOTTLENECK_ACTIVATION, BOTTLENECK_SCALING, 0.0)
        if kernels:
            _, z = bottleneck_launch.bottleneck_forward(*args, _seed())
        else:
            _, z, keep = bottleneck_forward_torch(*args, None)
        if p.mode != FWD_BWD:
            return
        grad = _meta(p.m, p.k, dtype=p.dtype)
        if kernels:
            bottleneck_launch.bottleneck_backward(grad, h, w_down, w_up, b_up, z, BOTTLENECK_ACTIVATION,
                                                  BOTTLENECK_SCALING, 0.0, _seed(), True, BOTTLENECK_NEEDS)
        else:
            bottleneck_backward_torch(grad, h, w_down, w_up, b_up, z, keep, BOTTLENECK_ACTIVATION, BOTTLENECK_SCALING,
                                      0.0, True, BOTTLENECK_NEEDS)

    return run


def bottleneck_paths(p: Problem, gpu: GpuSpec) -> list[PathRun]:
    return [PathRun(TORCH, _torch_choice(), _bottleneck_run(p, False), TORCH),
            PathRun(TRITON, (TRITON, *_validated_choice()), _bottleneck_run(p, True), TRITON)]


# --- Multi-adapter LoRA ------------------------------------------------------------------


def base_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The multi-LoRA op's base GEMM, ``F.linear`` (cuBLAS), before the LoRA term is added."""
    return F.linear(x, w)


def multi_lora_ids(p: Problem) -> torch.Tensor:
    """Adapter ids of the problem's tokens: token t uses slot ``t % L`` (distinct while T <= L)."""
    return torch.arange(p.m, dtype=torch.int64) % p.adapters


def _multi_lora_run(p: Problem, kernels: bool) -> Callable[[], None]:
    """The multi-LoRA op's forward: the base ``F.linear``, then the LoRA term added in place by
    the torch path or the Triton launcher the op picks for T tokens. The kernels skip the
    programs without work, so their traffic depends on the ids: for them the ids, ranks and
    scalings are real (CPU) tensors; the torch path's CUDA formulation reads no value on the
    host, so all of its tensors are meta."""

    # Made here, outside the recording: the op's caller provides them.
    scalings = torch.full((p.adapters,), LORA_SCALING)
    ranks = torch.full((p.adapters,), p.r, dtype=torch.int64)
    ids = multi_lora_ids(p)

    def run() -> None:
        x, w = _meta(p.m, p.k, dtype=p.dtype), _meta(p.n, p.k, dtype=p.dtype)
        a = _meta(p.adapters, p.r, p.k, dtype=p.adapter_dtype)
        b = _meta(p.adapters, p.n, p.r, dtype=p.adapter_dtype)
        y = base_linear(x, w)
        if not kernels:
            multi_lora_add_torch(y, x, a, b, _meta(p.adapters, dtype=torch.float32), _meta(p.m, dtype=torch.int64),
                                 _meta(p.adapters, dtype=torch.int64))
            return
        add = (multi_lora_launch.multi_lora_decode if p.m <= multi_lora_configs.DECODE_MAX_TOKENS
               else multi_lora_launch.multi_lora_segments_add)
        add(y, x, a, b, scalings, ids, ranks)

    return run


def multi_lora_paths(p: Problem, gpu: GpuSpec) -> list[PathRun]:
    return [PathRun(TORCH, _torch_choice(), _multi_lora_run(p, False), TORCH),
            PathRun(TRITON, (TRITON, *_validated_choice()), _multi_lora_run(p, True), TRITON)]


def paths(p: Problem, gpu: GpuSpec) -> list[PathRun]:
    """Every implementation planned for ``p`` on ``gpu``."""
    if p.op == LORA:
        return lora_paths(p, gpu)
    if p.op == QLORA:
        return qlora_paths(p, gpu)
    if p.op == BOTTLENECK:
        return bottleneck_paths(p, gpu)
    return multi_lora_paths(p, gpu)
