"""Model-level LoRA API, compatible with HF PEFT's configs, matching rules and files.

``LoraConfig`` (PEFT's fields), ``inject`` (add LoRA layers in place), ``load_adapter`` /
``save_adapter`` (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``),
``from_peft`` (convert a PEFT model), ``merge_and_unload``, ``unload`` and ``trainable_parameters``.
``AdapterConfig``: AdapterHub's bottleneck adapters, in AdapterHub's places and files.
"""

from fastpeft.model.adapter_io import adapter_state_dict, load_adapter, save_adapter
from fastpeft.model.bottleneck_config import AdapterConfig
from fastpeft.model.config import LoraConfig
from fastpeft.model.injection import ParameterCount, inject, merge_and_unload, trainable_parameters, unload
from fastpeft.model.peft_interop import from_peft
from fastpeft.model.prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from fastpeft.model.prompt_injection import merge_prefix

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "ParameterCount",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "adapter_state_dict",
    "from_peft",
    "inject",
    "load_adapter",
    "merge_and_unload",
    "merge_prefix",
    "save_adapter",
    "trainable_parameters",
    "unload",
]
