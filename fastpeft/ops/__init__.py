"""fastpeft's ops: fused kernels with torch reference implementations beside them."""

from fastpeft.ops.lora_linear import lora_linear, lora_linear_dropout_mask
from fastpeft.kernels.lora.ref import lora_linear_ref

__all__ = ["lora_linear", "lora_linear_dropout_mask", "lora_linear_ref"]
