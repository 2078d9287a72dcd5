"""inject / merge_and_unload / trainable_parameters: the modules PEFT's get_peft_model wraps
(with its r and scaling per module) are the ones we wrap, base weights are shared, only the
adapter trains, errors leave the model unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import LoraConfig, LoRALinear
from fastpeft.methods.lora.model import lora_layers
from tests.helpers.models import (
    TinyNet,
    assert_unchanged,
    our_layers,
    peft,
    peft_layers,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)
from tests.helpers.numerics import assert_close

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "tinynet": TinyNet}

MATCHING_CASES = {
    "list": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "suffix": ("llama", dict(target_modules=["self_attn.o_proj", "mlp.down_proj"])),
    "full-path": ("llama", dict(target_modules=["model.layers.1.mlp.up_proj", "k_proj"])),
    "regex": ("llama", dict(target_modules=r".*\.layers\.1\..*(k|up)_proj")),
    "all-linear": ("llama", dict(target_modules="all-linear")),
    "all-linear-exclude-list": ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "q_proj"])),
    "all-linear-exclude-regex": ("llama", dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
    "layers": ("llama", dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1])),
    "layers-int-pattern": ("llama", dict(target_modules=["v_proj"], layers_to_transform=0, layers_pattern="layers")),
    "patterns": ("llama", dict(
        target_modules="all-linear", use_rslora=True, r=4, lora_alpha=6,
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6}, alpha_pattern={"v_proj": 32, "down_proj": 1.5},
    )),
    "modules-to-save": ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    "gpt2-all-linear": ("gpt2", dict(target_modules="all-linear")),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
    "tinynet-all-linear": ("tinynet", dict(target_modules="all-linear", rank_pattern={"blocks.2.gate": 3, "proj": 5},
                                           alpha_pattern={"gate": 2})),
    "tinynet-suffix": ("tinynet", dict(target_modules=["proj"])),
    "tinynet-exclude-suffix": ("tinynet", dict(target_modules="all-linear", exclude_modules=["proj", "blocks.1.gate"])),
    "tinynet-layers": ("tinynet", dict(target_modules=["proj", "gate"], layers_to_transform=[0, 2],
                                       layers_pattern=["layers", "blocks"], exclude_modules=["blocks.2.gate"])),
}


@pytest.mark.parametrize("case", MATCHING_CASES, ids=str)
def test_wraps_the_modules_peft_wraps_with_the_same_r_and_scaling(case):
    model_name, kwargs = MATCHING_CASES[case]
    base = MODELS[model_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**kwargs))
    expected = peft_layers(theirs)
    assert our_layers(ours) == expected
    for name, layer in lora_layers(ours):
        assert layer.fan_in_fan_out == isinstance(base.get_submodule(name), transformers_conv1d())
    theirs_saved = {n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
                    for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n}
    ours_saved = {n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    assert ours_saved == theirs_saved


def transformers_conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def test_shares_base_weights_freezes_the_rest_and_starts_as_the_base():
    base = tiny_llama()
    ids = token_ids()
    expected = base(ids).logits
    originals = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    model = fastpeft.inject(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert model is base
    layers = dict(lora_layers(model))
    assert len(layers) == 4
    for name, layer in layers.items():
        assert layer.weight is originals[name].weight
        assert layer.base_module() is originals[name]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}.weight" for name in layers for ab in ("lora_A", "lora_B")}
    assert_close(model(ids).logits, expected, torch.float32, "logits at init (B = 0)")


def test_random_adapter_changes_outputs_and_only_it_gets_gradients():
    base = tiny_gpt2()
    ids = token_ids()
    base_logits = base(ids).logits.detach()
    model = fastpeft.inject(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
    logits = model(ids).logits
    assert (logits - base_logits).norm() > 1e-2 * base_logits.norm()
    logits.square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {f"transformer.h.{i}.attn.c_attn.{ab}.weight" for i in range(2) for ab in ("lora_A", "lora_B")}


def test_trainable_parameters_match_peft():
    base = tiny_llama()
    kwargs = dict(r=4, target_modules="all-linear", rank_pattern={"v_proj": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = fastpeft.inject(base, LoraConfig(**kwargs))
    count = fastpeft.trainable_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    assert count.percent == pytest.approx(100 * count.trainable / count.total)
    assert str(count) == (f"trainable params: {count.trainable:,d} || all params: {count.total:,d} "
                          f"|| trainable%: {count.percent:.4f}")
    assert fastpeft.trainable_parameters(nn.Module()) == (0, 0, 0.0)


def test_modules_to_save_trains_an_untied_copy():
    base = tiny_gpt2()  # lm_head is tied to the input embedding
    wte = base.transformer.wte.weight
    assert base.lm_head.weight is wte
    model = fastpeft.inject(base, LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True,
                                                  modules_to_save=["lm_head"]))
    assert model.lm_head.weight is not wte and torch.equal(model.lm_head.weight, wte)
    assert model.lm_head.weight.requires_grad and not wte.requires_grad


def test_conv1d_target_warns_like_peft_when_fan_in_fan_out_is_off():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False"):
        fastpeft.inject(tiny_gpt2(), LoraConfig(target_modules=["c_fc"]))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True"):
        fastpeft.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adapter_dtype_autocast_like_peft(dtype):
    layer = lora_layers(fastpeft.inject(TinyNet().to(dtype), LoraConfig(target_modules=["proj"])))[0][1]
    assert layer.weight.dtype == dtype and layer.lora_A.weight.dtype == torch.float32
    kept = lora_layers(fastpeft.inject(TinyNet().to(dtype), LoraConfig(target_modules=["proj"]),
                                       autocast_adapter_dtype=False))[0][1]
    assert kept.lora_A.weight.dtype == dtype


@pytest.mark.parametrize("model_name,kwargs", [
    ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, rank_pattern={"c_proj": 2})),
], ids=["llama", "gpt2"])
def test_merge_and_unload_keeps_outputs_and_restores_plain_modules(model_name, kwargs):
    base = MODELS[model_name]()
    originals = {name: m for name, m in base.named_modules()}
    model = fastpeft.inject(base, LoraConfig(r=4, init_lora_weights=False, **kwargs))
    ids = token_ids()
    adapted = model(ids).logits
    merged = fastpeft.merge_and_unload(model)
    assert merged is model and not lora_layers(merged)
    for name, _ in [(n, m) for n, m in originals.items() if n.endswith(("q_proj", "c_attn"))]:
        assert merged.get_submodule(name) is originals[name]
    assert fastpeft.methods.state.adapter_state(merged) is None
    assert_close(merged(ids).logits, adapted, torch.float32, "merged logits")
    with pytest.raises(ValueError, match="no fastpeft LoRA layers"):
        fastpeft.merge_and_unload(merged)


def test_failure_mid_build_leaves_model_unchanged(monkeypatch):
    model = tiny_llama()
    before = snapshot(model)
    original = LoRALinear.wrap
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while building a layer")
        return original(*args, **kwargs)

    monkeypatch.setattr(LoRALinear, "wrap", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        fastpeft.inject(model, LoraConfig(target_modules="all-linear"))
    assert len(calls) == 3
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target_modules=["nonexistent"]), ValueError, r"no module matches.*model\.layers\.0\.self_attn\.q_proj"),
    (dict(target_modules=["mlp"]), ValueError, r"cannot wrap: model\.layers\.0\.mlp \(LlamaMLP\)"),
    (dict(target_modules=["embed_tokens"]), ValueError, "Embedding"),
    (dict(target_modules="all-linear", exclude_modules=".*"), ValueError, "excluded"),
    (dict(target_modules=None), ValueError, "target_modules is None"),
    (dict(target_modules=["q_proj"], init_lora_weights="pissa"), ValueError, "init_lora_weights"),
    (dict(target_modules=["q_proj"], modules_to_save=["nope"]), ValueError, "modules_to_save"),
    (dict(target_modules=["q_proj"], modules_to_save=["q_proj"]), ValueError, "excluded"),
    (dict(target_modules=["q_proj", "lm_head"], modules_to_save=["head"]), ValueError, "both LoRA targets"),
], ids=lambda v: str(v)[:40])
def test_config_errors_leave_model_unchanged(kwargs, exc, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fastpeft.inject(model, LoraConfig(**kwargs))
    assert_unchanged(model, before)


def test_layer_index_needs_a_parent_segment_or_layers_pattern_like_peft():
    config = dict(target_modules=["proj"], layers_to_transform=[1])
    with pytest.raises(peft.utils.error.NoMatchingPeftModuleError):
        peft.get_peft_model(TinyNet(), peft.LoraConfig(**config))
    with pytest.raises(ValueError, match="no module matches"):
        fastpeft.inject(TinyNet(), LoraConfig(**config))


def test_argument_and_state_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastpeft.inject("model", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="config must be a fastpeft.LoraConfig"):
        fastpeft.inject(TinyNet(), {"target_modules": ["proj"]})
    model = fastpeft.inject(TinyNet(), LoraConfig(target_modules=["proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has fastpeft LoRA layers"):
        fastpeft.inject(model, LoraConfig(target_modules=["gate"]))
    assert_unchanged(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(TinyNet(), peft.LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="from_peft"):
        fastpeft.inject(peft_model.get_base_model(), LoraConfig(target_modules=["gate"]))
