"""Shared pieces of the model-level API tests: tiny models with random weights (no
downloads), PEFT-side views of an adapted model, and a model snapshot to prove that a
failed call changed nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.methods.lora.model import lora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, **overrides,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


class TinyNet(nn.Module):
    """A hand-built model: nested blocks in a ModuleList, a non-linear layer, a head, and an
    ``up_proj`` that ends with "proj" but not with ".proj" (PEFT's suffix rules tell them apart)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(12, 24)
        self.up_proj = nn.Linear(24, 24)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(24, 24), "gate": nn.Linear(24, 24, bias=False), "norm": nn.LayerNorm(24)})
            for _ in range(3)
        )
        self.lm_head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(self.embed(x))
        for block in self.blocks:
            h = block["norm"](h + block["proj"](h) * torch.sigmoid(block["gate"](h)))
        return self.lm_head(h)


def token_ids(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def peft_layers(peft_model: nn.Module) -> dict[str, tuple[int, float]]:
    """``{module path: (r, scaling)}`` of PEFT's LoRA layers, paths relative to the base model."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }


def our_layers(model: nn.Module) -> dict[str, tuple[int, float]]:
    return {name: (layer.r, layer.scaling) for name, layer in lora_layers(model)}


def snapshot(model: nn.Module) -> tuple:
    """Everything a failed call must leave alone: tensors, module types, trainability."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {name: type(m) for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    return state, types, flags, fastpeft.methods.state.adapter_state(model)


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, types, flags, adapter = snapshot(model)
    assert types == before[1]
    assert flags == before[2]
    assert adapter == before[3]
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key


def forward(model: nn.Module, seed: int = 1) -> torch.Tensor:
    """The output of a tiny model (or a PEFT wrapper of one) on fresh random inputs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, TinyNet):
        return model(torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(seed)))
    return model(token_ids(seed)).logits
