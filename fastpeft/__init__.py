"""fastpeft: fused Triton kernels for parameter-efficient fine-tuning, compatible with HF PEFT.

``fastpeft.ops.lora_linear`` is the fused LoRA linear op; ``fastpeft.LoRALinear`` the
drop-in ``nn.Linear`` replacement built on it. The model-level API (``fastpeft.api``):
``LoraConfig``, ``inject``, ``save_adapter`` / ``load_adapter`` (PEFT's files),
``from_peft``, ``merge_and_unload``, ``trainable_parameters``. ``fastpeft.integrations``:
HF Trainer checkpoints that hold the adapter only (``enable_adapter_checkpoints``).
``fastpeft.BottleneckAdapter`` and ``AdapterConfig``: AdapterHub's bottleneck adapters on
the fused ``fastpeft.ops.bottleneck_adapter`` op (``inject`` / ``load_adapter`` /
``save_adapter`` in AdapterHub's places and files; ``unload`` removes them).
``fastpeft.MultiAdapterModel``: many PEFT LoRA adapters on one model, mixed per sequence in a
batch (``forward`` / ``generate`` with ``adapter_names``), on ``fastpeft.MultiLoRALinear``
and the ``fastpeft.ops.multi_lora_linear`` op.
"""

from fastpeft import integrations, ops
from fastpeft._version import __version__
from fastpeft.api import (
    AdapterConfig,
    LoraConfig,
    ParameterCount,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    from_peft,
    inject,
    load_adapter,
    merge_and_unload,
    merge_prefix,
    save_adapter,
    trainable_parameters,
    unload,
)
from fastpeft.methods.bottleneck.layer import BottleneckAdapter
from fastpeft.methods.lora.dora_layer import DoRALinear
from fastpeft.methods.lora.layer import LoRALinear
from fastpeft.methods.lora.multi_layer import MultiLoRALinear
from fastpeft.serving import MultiAdapterModel

__all__ = [
    "AdapterConfig",
    "BottleneckAdapter",
    "DoRALinear",
    "LoRALinear",
    "LoraConfig",
    "MultiAdapterModel",
    "MultiLoRALinear",
    "ParameterCount",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "__version__",
    "from_peft",
    "inject",
    "integrations",
    "load_adapter",
    "merge_and_unload",
    "merge_prefix",
    "ops",
    "save_adapter",
    "trainable_parameters",
    "unload",
]
