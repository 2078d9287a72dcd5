"""bitsandbytes-quantized bases for the QLoRA tests: one ``Linear4bit`` / ``Linear8bitLt`` made
deterministically from an ``nn.Linear`` (quantized when moved to the CPU, as bitsandbytes
does), and the settings the model-level tests load a tiny Llama with."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")

# torchao's int8 weight-only quantization and its NF4Tensor, where torchao is installed (PEFT
# takes it from 0.16).
TORCHAO, TORCHAO_NF4 = "torchao-int8", "torchao-nf4"
TORCHAO_INSTALLED = importlib.util.find_spec("torchao") is not None
# to_nf4 takes weights of a multiple of 64 x 256 elements (its scales are quantized in blocks of
# 256 blocks of 64).
NF4_ELEMENTS = 64 * 256

# (name, transformers BitsAndBytesConfig kwargs, or {TORCHAO: True} for torchao's TorchAoConfig,
# {TORCHAO_NF4: True} for torchao's NF4Tensor): NF4 with double quantization (QLoRA's recipe),
# FP4 with bf16 storage and compute, int8, torchao's int8 weight-only and NF4.
MODEL_SETTINGS = [
    ("nf4-dq", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.float32)),
    ("fp4-bf16", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16,
                      bnb_4bit_quant_storage=torch.bfloat16)),
    ("int8", dict(load_in_8bit=True)),
    *([(TORCHAO, {TORCHAO: True}), (TORCHAO_NF4, {TORCHAO_NF4: True})] if TORCHAO_INSTALLED else []),
]


def linear_4bit(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                compute_dtype: torch.dtype | None = torch.float32, storage: torch.dtype = torch.uint8,
                weight_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                blocksize: int = 64) -> nn.Module:
    """``linear`` quantized to a bitsandbytes ``Linear4bit`` on ``device`` in blocks of
    ``blocksize`` (its own copy of the weights; bitsandbytes quantizes as the layer moves there)."""
    k, n = linear.in_features, linear.out_features
    layer = bnb.nn.Linear4bit(k, n, bias=linear.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to(weight_dtype).clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage,
                                     blocksize=blocksize, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device).train()


def linear_8bit(linear: nn.Linear, device: torch.device | str = "cpu") -> nn.Module:
    """``linear`` quantized to a frozen bitsandbytes ``Linear8bitLt`` on ``device``."""
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to(device).train()


def save_tiny_llama(path: Path) -> Path:
    """A tiny random Llama saved in full precision at ``path`` (every K a multiple of 64:
    bitsandbytes' CPU kernel is right there, so PEFT's bitsandbytes forward is exact too; q, o,
    the MLP's projections of 128 x 128: what torchao's to_nf4 takes)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def torchao_int8(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """``module``'s linear layers moved to ``device`` and quantized in place by torchao's int8
    weight-only config (without its process-wide inductor settings)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module.to(device), Int8WeightOnlyConfig(set_inductor_config=False))
    return module


def torchao_nf4(module: nn.Module) -> nn.Module:
    """Every linear layer of ``module`` that ``to_nf4`` takes (``NF4_ELEMENTS``) given an
    ``NF4Tensor`` weight, as torchtune's QLoRA does (the others stay in full precision)."""
    from torchao.quantization import to_nf4

    for layer in module.modules():
        if type(layer) is nn.Linear and layer.weight.numel() % NF4_ELEMENTS == 0:
            layer.weight = nn.Parameter(to_nf4(layer.weight.detach()), requires_grad=False)
    return module


def load_quantized(model_dir: Path, settings: dict) -> nn.Module:
    """The model at ``model_dir`` loaded by transformers with ``BitsAndBytesConfig(**settings)``
    (or torchao's ``TorchAoConfig`` for int8 weight-only; torchao's NF4 by ``torchao_nf4`` after
    loading) on the CPU, in training mode."""
    import transformers

    if settings.get(TORCHAO_NF4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", dtype=torch.float32)
        torchao_nf4(model.model)
        return model.train()
    if settings.get(TORCHAO):
        from torchao.quantization import Int8WeightOnlyConfig

        quantization = transformers.TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False))
    else:
        quantization = transformers.BitsAndBytesConfig(**settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization,
                                                                  device_map="cpu", dtype=torch.float32)
    return model.train()
