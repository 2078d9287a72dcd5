"""Triton kernels and their launchers. Importing this package does not import Triton;
``all_kernel_specs`` does."""

from __future__ import annotations


def all_kernel_specs() -> list:
    """Every kernel configuration the dispatchers can launch (``fastpeft check`` compiles them)."""
    from fastpeft.kernels.bottleneck.specs import bottleneck_kernel_specs
    from fastpeft.kernels.lora.specs import lora_kernel_specs
    from fastpeft.kernels.multi_lora.specs import multi_lora_kernel_specs
    from fastpeft.kernels.quant.specs import quant_kernel_specs

    return lora_kernel_specs() + bottleneck_kernel_specs() + multi_lora_kernel_specs() + quant_kernel_specs()
