"""Every configuration the quantized-weight launchers (``quant.launch``) can launch, for
``fastpeft check``'s ahead-of-time compile, FP fusion off as launched:

- dequantization: the 4-bit kernel with and without double quantization, and the int8 kernel,
  into each output dtype (bitsandbytes' compute dtypes);
- the fused decode kernel: 4-bit (with and without double quantization) and int8 weights, each
  (compute, adapter) dtype pair of ``configs.DECODE_DTYPE_PAIRS``, every padded rank, with and
  without bias.

Pointers and integers are specialized as multiples of 16, as a launch with torch-allocated
tensors and the usual sizes gets (N x K / 2 bytes, block sizes >= 64, N and K multiples of 16:
``launch.decode_fits`` sends other shapes on a GPU to the dequantize-then-GEMM path), but for the
arguments a kernel exempts (``do_not_specialize``)."""

from __future__ import annotations

from fastpeft.kernels.aot_spec import KernelSpec
from fastpeft.kernels.quant import configs
from fastpeft.kernels.quant.decode_kernel import qlora_decode_kernel
from fastpeft.kernels.quant.kernels import dequant_4bit_kernel, dequant_int8_kernel


def _spec(fn, name: str, pointers: dict[str, str], constexprs: dict, num_warps: int = configs.NUM_WARPS,
          num_stages: int = configs.NUM_STAGES) -> KernelSpec:
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "i32") for arg in fn.arg_names}
    return KernelSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                      num_stages=num_stages, enable_fp_fusion=False)


def _scale_pointers(weight: str) -> dict[str, str]:
    """The weight's pointer types: ``"int8"``, ``"4bit"`` or ``"4bit-nested"`` (uint8 scale codes);
    the arguments a kind does not read are fp32 placeholders, as the launchers pass them."""
    pointers = {"packed_ptr": "*i8" if weight == "int8" else "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32"}
    if weight == "4bit-nested":
        pointers["absmax_ptr"] = "*u8"
    return pointers


def decode_kernel_specs() -> list[KernelSpec]:
    """Every configuration of the fused decode kernel (module docstring)."""
    specs = []
    for weight in ("4bit", "4bit-nested", "int8"):
        for compute, lora in configs.DECODE_DTYPE_PAIRS:
            for has_bias in (False, True):
                for block_r in configs.DECODE_BLOCK_R_CHOICES:
                    pointers = {**_scale_pointers(weight), "x_ptr": f"*{compute}", "bias_ptr": f"*{compute}",
                                "s_ptr": f"*{lora}", "b_ptr": f"*{lora}", "y_ptr": f"*{compute}"}
                    numerics = {"UPCAST": False, "PRECISION": "tf32"}  # kernel_numerics of a 16-bit compute dtype
                    constexprs = {"INT8": weight == "int8", "NESTED": weight == "4bit-nested", "HAS_BIAS": has_bias,
                                  "BLOCK_M": configs.DECODE_BLOCK_M, "BLOCK_N": configs.DECODE_BLOCK_N,
                                  "BLOCK_K": configs.DECODE_BLOCK_K, "BLOCK_R": block_r, **numerics}
                    specs.append(_spec(qlora_decode_kernel,
                                       f"qlora_decode[{weight},{compute}/{lora},bias={has_bias},R={block_r}]",
                                       pointers, constexprs, configs.DECODE_WARPS, configs.DECODE_STAGES))
    return specs


def quant_kernel_specs() -> list[KernelSpec]:
    """All configurations of the dequantization kernels and the fused decode kernel."""
    specs = []
    for out in configs.OUT_DTYPES:
        for nested in (False, True):
            pointers = {**_scale_pointers("4bit-nested" if nested else "4bit"), "out_ptr": f"*{out}"}
            specs.append(_spec(dequant_4bit_kernel, f"dequant_4bit[nested={nested},{out}]", pointers,
                               {"NESTED": nested, "BLOCK": configs.BLOCK_BYTES}))
        specs.append(_spec(dequant_int8_kernel, f"dequant_int8[{out}]",
                           {"cb_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": f"*{out}"},
                           {"BLOCK": configs.BLOCK_INT8}))
    return specs + decode_kernel_specs()
