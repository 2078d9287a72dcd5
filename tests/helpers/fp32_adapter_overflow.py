"""The overflowing fp32-adapter case of the LoRA op: PEFT's layer on a 16-bit base with fp32
adapters (its default) and an input whose rank-r intermediate ``s * scaling`` is past fp16's
largest value (65504), while the output itself stays in range."""

from __future__ import annotations

import warnings

import torch

from tests.helpers.devices import DEVICE
from tests.helpers.models import peft

# Scaling 64 and |x| ~ 1000 put s * scaling past fp16's largest value.
OVERFLOW_K, OVERFLOW_N, OVERFLOW_R, OVERFLOW_SCALING = 64, 48, 8, 64.0


def overflowing_fp32_adapter_case(dtype: torch.dtype):
    """PEFT's ``lora.Linear`` on a ``dtype`` base with fp32 adapters (its default) and an
    input whose rank-r intermediate overflows 16 bits: ``(peft_layer, x)``."""
    model = torch.nn.Sequential(torch.nn.Linear(OVERFLOW_K, OVERFLOW_N)).to(DEVICE, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=OVERFLOW_R, lora_alpha=OVERFLOW_SCALING * OVERFLOW_R, target_modules=["0"])
        layer = peft.get_peft_model(model, config).base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, 1.0)
        layer.lora_B["default"].weight.normal_(0, 1e-3)
    a = layer.lora_A["default"].weight
    assert a.dtype == torch.float32
    x = (1000 * torch.randn(6, OVERFLOW_K, device=DEVICE)).to(dtype)
    assert (x.float() @ a.t() * OVERFLOW_SCALING).abs().max() > 65504, "the case must overflow a 16-bit rank-r side"
    return layer, x
