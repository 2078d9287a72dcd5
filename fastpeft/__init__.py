"""fastpeft: fused Triton kernels for parameter-efficient fine-tuning, compatible with HF PEFT.

``fastpeft.ops.lora_linear`` is the fused LoRA linear op; ``fastpeft.LoRALinear`` the
drop-in ``nn.Linear`` replacement built on it.
"""

from fastpeft import ops
from fastpeft.layers.lora_linear import LoRALinear

__version__ = "0.1.0"

__all__ = ["LoRALinear", "ops", "__version__"]
