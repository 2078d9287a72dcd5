"""Shared pieces of the prompt-tuning / prefix-tuning tests: tiny models (no downloads), a
local tokenizer, PEFT / fastpeft model pairs holding the same virtual-token weights, and
batches with padding on both sides."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from tests.helpers.models import VOCAB, tiny_gpt2, tiny_llama

import fastpeft
from fastpeft.methods.prompt.model import prompt_encoder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

N_VIRTUAL = 3
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# method: (config class name in both peft and fastpeft, fields); the MLPs are narrow on purpose
METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_mlp": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 24}),
    "ptuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 24}),
    "ptuning_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12}),
}


def tiny_bert_cls(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def configs(method: str, task_type: str = "CAUSAL_LM", **extra):
    """The PEFT and the fastpeft config of one method, same fields."""
    name, fields = METHODS[method]
    fields = {"task_type": task_type, "num_virtual_tokens": N_VIRTUAL, **fields, **extra}
    return getattr(peft, name)(**fields), getattr(fastpeft, name)(**fields)


def pair(base: nn.Module, method: str, task_type: str = "CAUSAL_LM", **extra):
    """(PEFT model, fastpeft model) on copies of ``base``; fastpeft's virtual-token
    parameters (and SEQ_CLS head) are set to PEFT's."""
    peft_config, config = configs(method, task_type, **extra)
    ours = fastpeft.inject(copy.deepcopy(base), config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    prompt_encoder(ours).load_state_dict(theirs.prompt_encoder["default"].state_dict())
    if task_type == "SEQ_CLS":
        ours.classifier.load_state_dict(theirs.base_model.classifier.modules_to_save["default"].state_dict())
    return theirs, ours


def padded_batch(seed: int = 1, length: int = 7):
    """input_ids, attention_mask and labels for 3 rows: left-padded by 2, right-padded by 3,
    unpadded (labels -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` makes from a mask (cumsum - 1, 0 on padding)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def local_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def encoder_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
