"""The public model-level API, compatible with HF PEFT's configs, matching rules and files
(and AdapterHub's for bottleneck adapters).

The method configs (``LoraConfig``, ``AdapterConfig``, ``PromptTuningConfig``,
``PrefixTuningConfig``, ``PromptEncoderConfig``); ``inject`` (add an adapter in place),
``load_adapter`` / ``save_adapter`` / ``adapter_state_dict`` (the method's format's files),
``from_peft`` (convert a PEFT model), ``merge_and_unload``, ``unload``, ``merge_prefix`` and
``trainable_parameters``. ``fastpeft.api.adapters`` dispatches to the methods and formats.
"""

from fastpeft.api.adapters import adapter_state_dict, inject, load_adapter, merge_and_unload, save_adapter, unload
from fastpeft.api.peft_interop import from_peft
from fastpeft.methods.bottleneck.config import AdapterConfig
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from fastpeft.methods.prompt.model import merge_prefix
from fastpeft.methods.state import ParameterCount, trainable_parameters

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
