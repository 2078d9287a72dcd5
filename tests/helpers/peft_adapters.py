"""PEFT LoRA adapters saved to disk for tiny random Llama and GPT-2 models: different ranks,
alphas, rsLoRA, rank/alpha patterns and target modules, each changing the model's output."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

# Each adapter: its PEFT LoraConfig keywords (init_lora_weights=False: B random, so every
# adapter changes the output).
LLAMA_ADAPTERS = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "all16": dict(r=16, lora_alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2},
                  alpha_pattern={"k_proj": 3.0}),
}
GPT2_ADAPTERS = {
    "attn8": dict(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True),
    "mlp2": dict(r=2, lora_alpha=4, target_modules=["c_fc", "mlp.c_proj"], fan_in_fan_out=True),
}


def save_adapters(base, adapters: dict, root) -> dict:
    """Save a PEFT LoRA adapter of ``base`` per ``adapters`` entry (random, nonzero B) under
    ``root / name``; returns the directories by name."""
    dirs = {}
    for n, (name, kwargs) in enumerate(adapters.items()):
        torch.manual_seed(100 + n)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():  # PEFT's non-default init draws B small: make every adapter matter
            for p_name, p in model.named_parameters():
                if "lora_B" in p_name:
                    p.normal_(0, 0.3)
        dirs[name] = root / name
        model.save_pretrained(str(dirs[name]))
    return dirs
