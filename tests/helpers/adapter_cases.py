"""Every fastpeft adapter type but plain LoRA as a named case, on a tiny random model with the
same weights every time: bottleneck adapters (AdapterHub's files), prompt tuning, prefix tuning
(with and without its MLP), P-tuning and DoRA (PEFT's files), on a Llama / GPT-2 LM or a BERT
sequence classifier."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.formats.file_names import ENCODER_STATE_NAME
from tests.helpers.training import VOCAB, build_model

transformers = pytest.importorskip("transformers")

# The native adapter files: PEFT's, and AdapterHub's (bottleneck adapters).
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
ADAPTERHUB_FILES = {"adapter_config.json", "adapter.safetensors"}
# Virtual tokens of the prompt cases; labels of the BERT classifier.
N_VIRTUAL = 3
NUM_LABELS = 3
# name: (base model, config factory, native adapter files); the configs cover dropout (whose
# RNG a resume must restore), AdapterHub's learned scaling, and both reparameterizations. No
# LSTM encoder_dropout: PEFT's file holds the prompts computed in the encoder's current mode,
# so a checkpoint saved in training mode holds prompts with dropout applied (as PEFT's do).
# The BERT classifier's prompt tuning trains (and saves) a copy of its head (modules_to_save).
CASES = {
    "seq_bn": ("llama", lambda: fastpeft.AdapterConfig("seq_bn", reduction_factor=4, dropout=0.1), ADAPTERHUB_FILES),
    "scaled_par_bn": ("gpt2", lambda: fastpeft.AdapterConfig("scaled_par_bn", reduction_factor=8), ADAPTERHUB_FILES),
    "prompt": ("llama", lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
               PEFT_FILES),
    "prefix": ("gpt2", lambda: fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
               PEFT_FILES),
    "prefix_mlp": ("llama", lambda: fastpeft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=True, encoder_hidden_size=16),
        PEFT_FILES | {ENCODER_STATE_NAME}),
    "bert_prompt_cls": ("bert", lambda: fastpeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N_VIRTUAL),
                        PEFT_FILES),
    "bert_double_seq_bn": ("bert", lambda: fastpeft.AdapterConfig("double_seq_bn", reduction_factor=4),
                           ADAPTERHUB_FILES),
    "ptuning_lstm": ("llama", lambda: fastpeft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, encoder_reparameterization_type="LSTM",
        encoder_hidden_size=8), PEFT_FILES | {ENCODER_STATE_NAME}),
    # DoRA on GPT-2's Conv1D layers (fan_in_fan_out), with dropout; B random so the magnitude matters.
    "dora": ("gpt2", lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn", "c_fc"],
                                                 use_dora=True, init_lora_weights=False), PEFT_FILES),
}


def base_model(arch: str) -> torch.nn.Module:
    """A tiny random Llama / GPT-2 LM (``build_model``) or BERT classifier, always the same weights."""
    if arch != "bert":
        return build_model(arch)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=NUM_LABELS, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def adapted(case: str, seed: int = 0) -> torch.nn.Module:
    """The case's base model (always the same weights) with an adapter initialised from ``seed``."""
    arch, config, _ = CASES[case]
    model = base_model(arch)
    torch.manual_seed(seed)
    return fastpeft.inject(model, config())
