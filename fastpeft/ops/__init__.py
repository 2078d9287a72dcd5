"""fastpeft's ops: fused kernels with torch reference implementations beside them."""

from fastpeft.ops.lora_linear import lora_linear, lora_linear_dropout_mask
from fastpeft.kernels.lora.ref import lora_linear_ref
from fastpeft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_dropout_mask
from fastpeft.kernels.bottleneck.ref import bottleneck_adapter_ref
from fastpeft.ops.multi_lora_linear import multi_lora_linear
from fastpeft.kernels.multi_lora.ref import multi_lora_linear_ref
from fastpeft.ops.qlora_linear import QuantizedWeight, qlora_linear
from fastpeft.ops.dora_linear import dora_linear

__all__ = [
    "QuantizedWeight",
    "bottleneck_adapter",
    "bottleneck_adapter_dropout_mask",
    "bottleneck_adapter_ref",
    "dora_linear",
    "lora_linear",
    "lora_linear_dropout_mask",
    "lora_linear_ref",
    "multi_lora_linear",
    "multi_lora_linear_ref",
    "qlora_linear",
]
