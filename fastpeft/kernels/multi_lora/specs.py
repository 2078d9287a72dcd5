"""Every configuration the multi-adapter LoRA launchers (``multi_lora.launch``) can launch,
for ``fastpeft check``'s ahead-of-time compile (sm_80 / sm_90: no spills, shared memory in
bounds, no GPU-scope fences).

Launches are specialized as Triton's launcher does for the problems the op sends to the
kernels on a GPU (``configs.kernel_friendly``: K and N multiples of 16, 16-byte aligned
operands): every pointer and every integer the kernel does not exempt (``do_not_specialize``)
is compiled as a multiple of 16. ``tests/kernels/multi_lora/test_specs.py`` checks that each launch
of the launchers over a grid of problems is one of these.
"""

from __future__ import annotations

import itertools

from fastpeft.kernels.aot_spec import KernelSpec
from fastpeft.kernels.multi_lora import configs
from fastpeft.kernels.multi_lora.kernels import (
    multi_lora_decode_expand_kernel,
    multi_lora_decode_shrink_kernel,
    multi_lora_expand_kernel,
    multi_lora_shrink_kernel,
    multi_lora_wgrad_kernel,
)

# (activation, adapter) dtypes: 16-bit models with their own-dtype or PEFT's fp32 adapters.
# fp32 activations reach the kernels only in the interpreter (``configs.kernel_dtypes``).
DTYPE_CASES = (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"))

# Pointer roles: activations and their gradients in the activation dtype, slots and their
# gradients in the adapters' dtype, the metadata int64, s / dS / scalings fp32.
_ACT = {"x_ptr", "y_ptr"}
_LORA = {"a_ptr", "b_ptr", "out_ptr"}
_INT64 = {"ids_ptr", "ranks_ptr", "order_ptr", "tile_adapter_ptr", "tile_row_ptr", "seg_start_ptr", "seg_end_ptr"}




def _spec(fn, act: str, lora: str, constexprs: dict, tile: configs.Tile) -> KernelSpec:
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in _ACT:
            signature[arg] = f"*{act}"
        elif arg in _LORA:
            signature[arg] = f"*{lora}"
        elif arg in _INT64:
            signature[arg] = "*i64"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        else:
            signature[arg] = "i32"
    values = ",".join(f"{k}={v}" for k, v in constexprs.items())
    name = f"{fn.__name__}[{values},w{tile.num_warps},s{tile.num_stages},{act}/{lora}]"
    return KernelSpec(name=name, fn=fn, signature=signature, constexprs=dict(constexprs),
                      num_warps=tile.num_warps, num_stages=tile.num_stages)


def multi_lora_kernel_specs() -> list[KernelSpec]:
    """All configurations of the multi-adapter LoRA kernels."""
    specs: list[KernelSpec] = []
    shrink = configs.DECODE_SHRINK
    for act, lora in DTYPE_CASES:
        prec = "tf32"  # launch.precision for 16-bit activations
        specs.append(_spec(multi_lora_decode_shrink_kernel, act, lora,
                           {"BLOCK_R": shrink.block_r, "BLOCK_K": shrink.block_n}, shrink))
        for block_n, align in itertools.product(configs.DECODE_EXPAND_BLOCK_NS, configs.DECODE_RANK_ALIGNS):
            expand = configs.decode_expand_tile_of(block_n)
            specs.append(_spec(multi_lora_decode_expand_kernel, act, lora,
                               {"BLOCK_N": expand.block_n, "BLOCK_R": expand.block_r,
                                "SPLIT_BLOCK": configs.DECODE_SPLIT_BLOCK, "R_ALIGN": align}, expand))
        for block_m, block_r in itertools.product(configs.all_segment_block_ms(), configs.RANK_BLOCKS):
            t = configs.Tile(block_m, configs.SHRINK_BLOCK_K, block_r, configs.SEGMENT_WARPS, configs.SEGMENT_STAGES)
            # x A^T (forward) and dY B (backward's dS): one signature.
            for split_k in (False, True):
                specs.append(_spec(multi_lora_shrink_kernel, act, lora,
                                   {"BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_K": t.block_n, "PRECISION": prec,
                                    "SPLIT_K": split_k}, t))
        expand_tiles = {configs.Tile(m, configs.EXPAND_BLOCK_N, configs.expand_rank_block(m, r), configs.SEGMENT_WARPS,
                                     configs.SEGMENT_STAGES)
                        for m, r in itertools.product(configs.all_segment_block_ms(), configs.RANK_BLOCKS)}
        for t, sum_splits in itertools.product(sorted(expand_tiles, key=lambda t: (t.block_m, t.block_r)),
                                               (False, True)):
            # y += s B^T (forward, its shrink split or not) and dX += dS A (backward): one signature.
            specs.append(_spec(multi_lora_expand_kernel, act, lora,
                               {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_R": t.block_r, "PRECISION": prec,
                                "SUM_SPLITS": sum_splits}, t))
        for block_r in configs.RANK_BLOCKS:
            t = configs.wgrad_tile(block_r)
            # dA (X = x) and dB (X = dY): one signature.
            specs.append(_spec(multi_lora_wgrad_kernel, act, lora,
                               {"BLOCK_M": t.block_m, "BLOCK_R": block_r, "BLOCK_C": t.block_n, "PRECISION": prec}, t))
    return specs
