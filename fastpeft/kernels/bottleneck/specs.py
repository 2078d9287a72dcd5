"""Every compile-time configuration of the bottleneck adapter's Triton kernels that the
launchers can produce, as ``KernelSpec``s for ``fastpeft check`` (ahead-of-time compile for
sm_80 / sm_90, 0 spills).

For each kernel: every tile the planner (``configs``) can hand it, with every value of its
constexpr flags (``HAS_DROPOUT``; ``NEED_DH`` for the column kernel; the dh kernel's rank
step as its ``BLOCK_R``), and the LoRA weight-gradient kernel on the wide backward's rank
block (``configs.WIDE_RANK_BLOCK``). The activation, biases,
learned scaling and residual-is-h are runtime arguments (one compiled kernel covers them).
Three dtype cases: bf16 h with fp32 adapter weights (a 16-bit model with an fp32 adapter),
bf16 h with bf16 weights (the down projection on the bf16 tensor cores) and fp16 h with fp16
weights. Scalars follow Triton's launch-time specialization of
aligned launches (``configs.kernel_friendly``): unit strides become the constexpr 1, arguments
exempt from specialization (``do_not_specialize``) stay plain, other sizes, strides and pointers
are multiples of 16.
"""

from __future__ import annotations

import itertools

from fastpeft.kernels.aot_spec import KernelSpec
from fastpeft.kernels.bottleneck.configs import WIDE_RANK_BLOCK, Tile, tile_choices
from fastpeft.kernels.bottleneck.kernels import (
    bottleneck_bwd_dh_kernel,
    bottleneck_bwd_dz_kernel,
    bottleneck_bwd_dz_sum_kernel,
    bottleneck_bwd_wgrad_dh_kernel,
    bottleneck_down_kernel,
    bottleneck_down_sum_kernel,
    bottleneck_up_kernel,
)
from fastpeft.kernels.lora.specs import wgrad_spec

# (h dtype, adapter weight dtype) cases.
DTYPE_CASES = (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"))

# Strides equal to 1 for contiguous operands (h, the residual and dOut along D; W_down along D;
# W_up along R; the biases): Triton's launcher turns them into constexprs.
_UNIT_STRIDES = {"stride_hd", "stride_resd", "stride_gd", "stride_wdd", "stride_wur", "stride_bd", "stride_bu"}
# Pointers by role: h's dtype, the adapter weights' dtype, the int64 seed; the rest are fp32.
_H_POINTERS = {"h_ptr", "res_ptr", "out_ptr", "g_ptr", "dh_ptr"}
# The row passes' (down projection, dz) numerics on a GPU (``launch_device.kernel_numerics``:
# UPCAST is for the interpreter only).
_ROW_PASS_NUMERICS = {"UPCAST": False, "PRECISION": "tf32"}
_W_POINTERS = {"wd_ptr", "bd_ptr", "wu_ptr", "bu_ptr"}
_FLOAT_SCALARS = {"scaling", "keep_scale"}


def _spec(fn, name: str, act: str, weights: str, constexprs: dict, tile: Tile, r_block: int) -> KernelSpec:
    """Signature of ``fn`` for the dtype case, with unit strides and ``constexprs`` fixed."""
    signature, values = {}, {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg], values[arg] = "constexpr", constexprs[arg]
        elif arg in _UNIT_STRIDES:
            signature[arg], values[arg] = "constexpr", 1
        elif arg in _H_POINTERS:
            signature[arg] = f"*{act}"
        elif arg in _W_POINTERS:
            signature[arg] = f"*{weights}"
        elif arg == "seed_ptr":
            signature[arg] = "*i64"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        elif arg in _FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    flags = ",".join(f"{k}={int(v)}" for k, v in constexprs.items() if isinstance(v, bool))
    full_name = (f"{name}[{tile.block_m}x{tile.block_d},w{tile.num_warps},s{tile.num_stages},R{r_block},"
                 f"{flags},{act}/{weights}]")
    return KernelSpec(name=full_name, fn=fn, signature=signature, constexprs=values,
                      num_warps=tile.num_warps, num_stages=tile.num_stages)


def bottleneck_kernel_specs() -> list[KernelSpec]:
    """All configurations of the bottleneck adapter's kernels."""
    specs: list[KernelSpec] = []
    for (act, weights), (kind, r_block, t) in itertools.product(DTYPE_CASES, tile_choices()):
        base = {"BLOCK_M": t.block_m, "BLOCK_D": t.block_d, "BLOCK_R": r_block, "PRECISION": "tf32"}
        if kind == "down":
            for drop in (False, True):
                specs.append(_spec(bottleneck_down_kernel, "bottleneck_down", act, weights,
                                   {**base, **_ROW_PASS_NUMERICS, "HAS_DROPOUT": drop}, t, r_block))
        elif kind == "sum":
            for fn, name in ((bottleneck_down_sum_kernel, "bottleneck_down_sum"),
                             (bottleneck_bwd_dz_sum_kernel, "bottleneck_bwd_dz_sum")):
                specs.append(_spec(fn, name, act, weights, {"BLOCK_M": t.block_m, "BLOCK_R": r_block}, t, r_block))
        elif kind == "up":
            specs.append(_spec(bottleneck_up_kernel, "bottleneck_up", act, weights,
                               {"BLOCK_M": t.block_m, "BLOCK_N": t.block_d, "BLOCK_R": r_block, "PRECISION": "tf32"},
                               t, r_block))
        elif kind == "rows":
            specs.append(_spec(bottleneck_bwd_dz_kernel, "bottleneck_bwd_dz", act, weights,
                               {**base, **_ROW_PASS_NUMERICS}, t, r_block))
        elif kind == "dh":
            for drop in (False, True):
                specs.append(_spec(bottleneck_bwd_dh_kernel, "bottleneck_bwd_dh", act, weights,
                                   {**base, "HAS_DROPOUT": drop}, t, r_block))
        else:
            for drop, need_dh in itertools.product((False, True), (True, False)):
                specs.append(_spec(bottleneck_bwd_wgrad_dh_kernel, "bottleneck_bwd_wgrad_dh", act, weights,
                                   {**base, "HAS_DROPOUT": drop, "NEED_DH": need_dh}, t, r_block))
    # The wide backward's weight-gradient GEMMs: dW_down (X = h, the mask of h) and dW_up
    # (X = dOut, no mask), L = dz or act(z) in fp32 whatever the weights' dtype.
    for act in dict.fromkeys(act for act, _ in DTYPE_CASES):
        specs += [wgrad_spec(act, "fp32", WIDE_RANK_BLOCK, drop) for drop in (True, False)]
    return specs
