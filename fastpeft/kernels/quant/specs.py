"""Every configuration the dequantization launchers (``quant.launch``) can launch, for
``fastpeft check``'s ahead-of-time compile: the 4-bit kernel with and without double
quantization, and the int8 kernel, into each output dtype (bitsandbytes' compute dtypes), FP
fusion off as launched. Pointers and integers are specialized as multiples of 16, as a launch
with torch-allocated tensors and the usual sizes gets (N x K / 2 bytes, block sizes >= 64,
K a multiple of 16)."""

from __future__ import annotations

from fastpeft.kernels.aot_spec import KernelSpec
from fastpeft.kernels.quant import configs
from fastpeft.kernels.quant.kernels import dequant_4bit_kernel, dequant_int8_kernel


def _spec(fn, name: str, pointers: dict[str, str], constexprs: dict) -> KernelSpec:
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "i32") for arg in fn.arg_names}
    return KernelSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=configs.NUM_WARPS,
                      num_stages=configs.NUM_STAGES, enable_fp_fusion=False)


def quant_kernel_specs() -> list[KernelSpec]:
    """All configurations of the dequantization kernels."""
    specs = []
    for out in configs.OUT_DTYPES:
        for nested in (False, True):
            pointers = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                        "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
                        "out_ptr": f"*{out}"}
            specs.append(_spec(dequant_4bit_kernel, f"dequant_4bit[nested={nested},{out}]", pointers,
                               {"NESTED": nested, "BLOCK": configs.BLOCK_BYTES}))
        specs.append(_spec(dequant_int8_kernel, f"dequant_int8[{out}]",
                           {"cb_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": f"*{out}"},
                           {"BLOCK": configs.BLOCK_INT8}))
    return specs
