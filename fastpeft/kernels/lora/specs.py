"""Every compile-time configuration of the LoRA kernels that the launchers can produce,
as ``KernelSpec``s for ``fastpeft check`` (ahead-of-time compile for sm_80 / sm_90).

For each kernel: every tile the planners in ``fastpeft.kernels.lora.configs`` can hand it, on the
architecture family that uses it, with every padded rank and every constexpr flag the
launcher can set. Two dtype cases: bf16 activations with fp32 LoRA weights (PEFT's default)
and fp16 with fp16 LoRA weights. fp32 activations never reach the kernels on a GPU (the op
routes them to the torch path). Scalars follow Triton's launch-time specialization of the
launches ``fastpeft.kernels.lora.configs.kernel_friendly`` admits: unit strides become the constexpr 1, the
arguments a kernel exempts from specialization (``do_not_specialize``: M, the rank...) stay
plain, other sizes, strides and pointers are multiples of 16 (tests/kernels/lora/test_specs.py
checks every launch against this).
"""

from __future__ import annotations

import itertools

from fastpeft.kernels.aot_spec import KernelSpec
from fastpeft.kernels.lora.configs import (
    BLOCK_R_CHOICES,
    GROUP_M,
    TileConfig,
    gemm_tile_choices,
    may_fuse_shrink,
    reduce_tile,
    scaled_forward_tiles,
    shrink_tile_choices,
    split_epilogue_tile,
    tma_tile,
    wgrad_tile,
)
from fastpeft.kernels.lora.kernels import (
    lora_bwd_dx_kernel,
    lora_bwd_dx_split_epilogue_kernel,
    lora_bwd_wgrad_kernel,
    lora_fwd_kernel,
    lora_fwd_split_epilogue_kernel,
    lora_fwd_tma_kernel,
    lora_gemm_split_kernel,
    lora_shrink_kernel,
    sum_partials_kernel,
)
from fastpeft.kernels.lora.hybrid_launch import hybrid_kernel_specs
from fastpeft.kernels.philox_dropout import keep_mask_kernel

# (activation dtype, LoRA weight dtype) cases: PEFT's default on a 16-bit model (fp32
# adapters), adapters in the model's dtype, and both on fp16 and on bf16 models.
DTYPE_CASES = (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp16", "fp32"))
# Bytes an element of each dtype name: the fusion rule compares A's bytes with W's.
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Stride arguments equal to 1 for contiguous operands; Triton's launcher turns such
# arguments into constexprs, so the checked code is the code that runs.
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_dyn", "stride_xc"}
# The split-K GEMM's unit strides: P's columns, and Q's columns (forward: W [N, K]) or rows
# (dX: W^T viewed as [K, N], W's strides swapped).
_SPLIT_UNIT_STRIDES = {"fwd": {"stride_pr", "stride_qr"}, "dx": {"stride_pr", "stride_qn"}}
_FLOAT_SCALARS = {"scaling", "keep_scale", "scale"}
# Tensor-descriptor arguments (the TMA forward): the tile's fields giving their block shape.
_DESCRIPTORS = {"x_desc": ("block_m", "block_k"), "w_desc": ("block_n", "block_k")}

# Pointer arguments by role: activations/base weights use the activation dtype, the LoRA
# weights their own, the seed is int64, the mask int8, the rest are fp32 buffers.
_ACT_POINTERS = {"x_ptr", "w_ptr", "bias_ptr", "y_ptr", "u_ptr", "dy_ptr", "dx_ptr", "p_ptr", "q_ptr"}
# total_ptr: the sum of partials, in the LoRA weights' dtype (dA, dB) or fp32 (dS).
_LORA_POINTERS = {"a_ptr", "b_ptr", "total_ptr"}
_OTHER_POINTERS = {"seed_ptr": "*i64", "out_ptr": "*i8"}

# Tensor-core numerics of 16-bit activations (the launcher's ``_numerics``).
_NUMERICS = {"UPCAST": False, "PRECISION": "tf32"}


def _spec(fn, name: str, act: str, lora: str, constexprs: dict, tile: TileConfig,
          family: int | None = None, wgmma: bool = False, unit_strides: set | None = None,
          tma: bool = False) -> KernelSpec:
    """Signature of ``fn`` for the dtype case, with unit strides (``_UNIT_STRIDES`` unless
    given) and ``constexprs`` fixed."""
    signature, values = {}, {}
    units = _UNIT_STRIDES if unit_strides is None else unit_strides
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg], values[arg] = "constexpr", constexprs[arg]
        elif arg in units:
            signature[arg], values[arg] = "constexpr", 1
        elif arg in _DESCRIPTORS:
            rows, cols = (getattr(tile, field) for field in _DESCRIPTORS[arg])
            signature[arg] = f"tensordesc<{act}[{rows}, {cols}]>"
        elif arg in _ACT_POINTERS:
            signature[arg] = f"*{act}"
        elif arg in _LORA_POINTERS:
            signature[arg] = f"*{lora}"
        elif arg in _OTHER_POINTERS:
            signature[arg] = _OTHER_POINTERS[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        elif arg in _FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    flags = ",".join(f"{k}={int(v)}" for k, v in constexprs.items() if isinstance(v, bool) and k != "UPCAST")
    if unit_strides is not None:
        flags += "," + "/".join(sorted(unit_strides))
    full_name = (f"{name}[{tile.block_m}x{tile.block_n}x{tile.block_k},w{tile.num_warps},s{tile.num_stages},"
                 f"R{constexprs.get('BLOCK_R', 0)},{flags},{act}/{lora}]")
    return KernelSpec(name=full_name, fn=fn, signature=signature, constexprs=values,
                      num_warps=tile.num_warps, num_stages=tile.num_stages,
                      expects_wgmma_on_sm90=wgmma, expects_tma_on_sm90=tma, arch_family=family)


def _uses_wgmma(tile: TileConfig) -> bool:
    """Hopper's wgmma takes tiles of >= 64 rows with a warpgroup (4 warps) per 64 rows."""
    return tile.block_m >= 64 and tile.num_warps >= tile.block_m // 64 * 4


def _split_tiles() -> list[tuple[TileConfig, int | None]]:
    """Every GEMM tile, once, with the architecture family using it (None: all, or both)."""
    families: dict[TileConfig, set] = {}
    for t, family, _ in gemm_tile_choices():
        families.setdefault(t, set()).add(family)
    return [(t, fams.pop() if len(fams) == 1 else None) for t, fams in families.items()]


def wgrad_spec(act: str, lora: str, block_r: int, dropout: bool) -> KernelSpec:
    """``lora_bwd_wgrad_kernel`` on its tile (``wgrad_tile``) for X in ``act``, rank tile
    ``block_r`` (the bottleneck adapter's wide backward adds its own), with or without the
    dropout mask; ``lora`` only names the case (L and the partials are fp32)."""
    w = wgrad_tile()
    return _spec(lora_bwd_wgrad_kernel, "lora_bwd_wgrad", act, lora,
                 {"HAS_DROPOUT": dropout, "BLOCK_M": w.block_m, "BLOCK_C": w.block_n, "BLOCK_R": block_r,
                  "PRECISION": _NUMERICS["PRECISION"]}, w)


def _forward_specs(act: str, lora: str, t: TileConfig, family: int | None, r: int, dora: bool) -> list[KernelSpec]:
    """``lora_fwd_kernel`` on tile ``t`` at rank tile ``r``: with and without the fused shrink
    where ``may_fuse_shrink`` allows it; ``dora``: with DoRA's epilogue."""
    fusable = may_fuse_shrink(t, r, ELEMENT_BYTES[lora], ELEMENT_BYTES[act])
    return [_spec(lora_fwd_kernel, "lora_fwd", act, lora,
                  {"BLOCK_R": r, "GROUP_M": GROUP_M, **_NUMERICS, "HAS_BIAS": True, "HAS_SCALE": dora,
                   "FUSE_SHRINK": fuse, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k},
                  t, family, _uses_wgmma(t))
            for fuse in ((False, True) if fusable else (False,))]


def lora_kernel_specs() -> list[KernelSpec]:
    """All configurations of the LoRA kernels and the mask kernel."""
    specs: list[KernelSpec] = []
    for (act, lora), (t, family, drop) in itertools.product(DTYPE_CASES, gemm_tile_choices()):
        for r in BLOCK_R_CHOICES:
            base = {"BLOCK_R": r, "GROUP_M": GROUP_M, **_NUMERICS}
            specs.append(_spec(
                lora_bwd_dx_kernel, "lora_bwd_dx", act, lora,
                {**base, "HAS_DROPOUT": drop, "BLOCK_M": t.block_m, "BLOCK_K": t.block_n, "BLOCK_N": t.block_k},
                t, family, _uses_wgmma(t)))
            if drop:  # the forward GEMM has no dropout epilogue
                continue
            specs += _forward_specs(act, lora, t, family, r, dora=False)
    # DoRA's forward (HAS_SCALE) on its own tiles (configs.scaled_forward_tiles).
    for (act, lora), (t, family), r in itertools.product(DTYPE_CASES, scaled_forward_tiles(), BLOCK_R_CHOICES):
        specs += _forward_specs(act, lora, t, family, r, dora=True)
    e = split_epilogue_tile()
    tma = tma_tile()
    for act, lora in DTYPE_CASES:
        # The opt-in TMA forward (sm_90 only, never fused); with a bias, as lora_fwd: the larger variant.
        # (never DoRA's: plan_forward gives its epilogue a smaller tile than the TMA forward's)
        for r in BLOCK_R_CHOICES:
            specs.append(_spec(
                lora_fwd_tma_kernel, "lora_fwd_tma", act, lora,
                {"HAS_BIAS": True, "HAS_SCALE": False, "BLOCK_M": tma.block_m, "BLOCK_N": tma.block_n,
                 "BLOCK_K": tma.block_k, "BLOCK_R": r, "GROUP_M": GROUP_M, **_NUMERICS},
                tma, 90, _uses_wgmma(tma), tma=True))
        # Split-K GEMM: no epilogue, so one spec per tile (with or without dropout) and use.
        for (t, family), use in itertools.product(_split_tiles(), _SPLIT_UNIT_STRIDES):
            specs.append(_spec(
                lora_gemm_split_kernel, f"lora_gemm_split_{use}", act, lora,
                {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_RED": t.block_k, "GROUP_M": GROUP_M,
                 **_NUMERICS},
                t, family, _uses_wgmma(t), unit_strides=_SPLIT_UNIT_STRIDES[use]))
        for r in BLOCK_R_CHOICES:
            base = {"BLOCK_M": e.block_m, "BLOCK_R": r, "GROUP_M": GROUP_M, **_NUMERICS}
            for dora in (False, True):
                specs.append(_spec(
                    lora_fwd_split_epilogue_kernel, "lora_fwd_split_epilogue", act, lora,
                    {**base, "HAS_BIAS": True, "HAS_SCALE": dora, "BLOCK_N": e.block_n}, e))
            for drop in (False, True):
                specs.append(_spec(
                    lora_bwd_dx_split_epilogue_kernel, "lora_bwd_dx_split_epilogue", act, lora,
                    {**base, "HAS_DROPOUT": drop, "BLOCK_K": e.block_n}, e))
        # The shrink computes s from x and A, and dS from dY and B^T (copied contiguous): one
        # signature for both.
        for t, r in shrink_tile_choices():
            for drop in (True, False):
                specs.append(_spec(
                    lora_shrink_kernel, "lora_shrink", act, lora,
                    {"HAS_DROPOUT": drop, "BLOCK_M": t.block_m, "BLOCK_K": t.block_k, "BLOCK_R": r,
                     "PRECISION": _NUMERICS["PRECISION"]},
                    t))
        # dA (X = x, with dropout or not) and dB (X = dY, without): one signature for both.
        specs += [wgrad_spec(act, lora, r, drop) for r, drop in itertools.product(BLOCK_R_CHOICES, (True, False))]
    # Sums of partials into dS (fp32) and into dA / dB (the LoRA weights' dtype).
    t = reduce_tile()
    for total in dict.fromkeys(["fp32", *(lora for _, lora in DTYPE_CASES)]):
        specs.append(_spec(sum_partials_kernel, "sum_partials", "fp32", total, {"BLOCK": t.block_m}, t))
    specs.append(_spec(keep_mask_kernel, "keep_mask", "fp32", "fp32", {"BLOCK_M": 32, "BLOCK_K": 32},
                       TileConfig(32, 32, 0, 4, 1)))
    specs += hybrid_kernel_specs(_spec)  # the cuBLAS-hybrid path's kernels (lora_hybrid_launch)
    return specs
