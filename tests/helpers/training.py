"""The tiny models and the counting task of the training tests: a 2-layer Llama or GPT-2
with random weights (no downloads), batches of sequences counting up by one (the next token
is always predictable), LoRA on every attention and MLP projection, and torch on one thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import fastpeft

transformers = pytest.importorskip("transformers")

# The models' vocabulary; the counting sequences run mod VOCAB.
VOCAB = 128
# Rank and alpha of ``lora_config``.
RANK, ALPHA = 8, 16
# LoRA targets per architecture: every projection of attention and MLP (not the LM head).
TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: at these sizes threads only add overhead, and on a busy
    machine (CI runners, the distributed tests' ranks) spinning OpenMP threads slow the
    runs down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_model(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer, 64-wide causal LM (``"llama"`` or ``"gpt2"``) with random weights, fp32,
    no dropout of its own.

    ``initializer_range=0.2`` (not 0.02): the frozen output head then has weights large
    enough for the final norm's unit-RMS features to reach confident predictions, so the
    adapter can drive the loss far down.
    """
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.2,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    return transformers.GPT2LMHeadModel(config)


def shift_batch(generator: torch.Generator | None = None, batch: int = 8, length: int = 16) -> torch.Tensor:
    """``[batch, length]`` token ids counting up by one (mod ``VOCAB``) from random starts
    drawn from ``generator`` (torch's default one if None)."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % VOCAB


def lora_config(arch: str, dropout: float = 0.0, library=fastpeft):
    """The LoRA config of these tests, as a ``fastpeft.LoraConfig`` or (``library=peft``) a
    ``peft.LoraConfig``: rank 8, alpha 16, every ``TARGETS[arch]`` projection."""
    return library.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                              target_modules=list(TARGETS[arch]), fan_in_fan_out=arch == "gpt2")


def lora_model(arch: str, dropout: float = 0.0) -> nn.Module:
    """``build_model(arch)`` with LoRA added by ``fastpeft.inject`` and ``lora_B`` drawn from
    N(0, 0.1) instead of PEFT's zeros, so that ``lora_A`` gets nonzero gradients too
    (B = 0 gives dA = 0)."""
    model = fastpeft.inject(build_model(arch), lora_config(arch, dropout))
    for module in model.modules():
        if isinstance(module, fastpeft.LoRALinear):
            nn.init.normal_(module.lora_B.weight, std=0.1)
    return model


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the trainable (LoRA) parameters, by name."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
