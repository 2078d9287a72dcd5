"""Where fastpeft and PEFT meet at the edges: a tied output embedding as a LoRA target, the
PEFT wrapper left over after ``from_peft``, and PEFT's MiCA variant (lora_B frozen)."""

from __future__ import annotations

import warnings

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft import LoraConfig
from fastpeft.methods.lora.model import lora_layers
from tests.helpers.models import peft, tiny_gpt2, tiny_llama, token_ids, transformers
from tests.helpers.numerics import assert_close


def test_tied_lm_head_warns_and_merge_keeps_the_input_embedding(tmp_path):
    """GPT-2's ``lm_head`` shares the input embedding's weight. Targeting it warns (as PEFT
    does); ``merge_and_unload`` gives ``lm_head`` its own merged weight, so the embedding is
    untouched and the merged model computes what the adapted one did, also after
    ``save_pretrained`` / ``from_pretrained``."""
    model = tiny_gpt2()
    embedding = model.transformer.wte.weight.detach().clone()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match="lm_head's weight is tied to transformer.wte.weight"):
        fastpeft.inject(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    ids = token_ids()
    adapted = model(ids).logits
    with pytest.warns(UserWarning, match="lm_head had a tied weight"):
        fastpeft.merge_and_unload(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert_close(model(ids).logits, adapted, torch.float32, "merged logits")
    model.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_close(reloaded(ids).logits, adapted, torch.float32, "reloaded merged logits")


def test_untied_targets_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.merge_and_unload(fastpeft.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"])))


def _peft_model(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs)
        return peft.get_peft_model(tiny_llama(), config)


def test_peft_wrapper_after_from_peft_saves_the_adapter_and_merges(tmp_path):
    """The README's ``fastpeft.from_peft(peft_model)`` with the result dropped: the wrapper's
    ``save_pretrained`` writes every adapter tensor (not 0), PEFT loads it back to the same
    outputs, and its ``merge_and_unload`` merges."""
    peft_model = _peft_model(init_lora_weights=False)
    ids = token_ids()
    expected = peft_model(ids).logits
    fastpeft.from_peft(peft_model)
    assert_close(peft_model(ids).logits, expected, torch.float32, "wrapper forward")
    peft_model.save_pretrained(tmp_path)
    assert len(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")) == 8  # 2 layers x 2 modules x A, B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close(reloaded(ids).logits, expected, torch.float32, "PEFT reload")
    merged = peft_model.merge_and_unload()
    assert not lora_layers(merged) and isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert_close(merged(ids).logits, expected, torch.float32, "merged")


@pytest.mark.parametrize("call", [
    lambda m: m.set_adapter("default"), lambda m: m.unload(), lambda m: m.merge_adapter(),
    lambda m: m.disable_adapter().__enter__(), lambda m: m.add_adapter("b", peft.LoraConfig()),
    lambda m: m.save_pretrained("x", safe_serialization=False),
], ids=["set_adapter", "unload", "merge_adapter", "disable_adapter", "add_adapter", "pickle-save"])
def test_peft_wrapper_methods_that_would_do_nothing_raise(call):
    peft_model = _peft_model()
    fastpeft.from_peft(peft_model)
    with pytest.raises((RuntimeError, ValueError), match="from_peft"):
        call(peft_model)


def _mica_dir(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.normal_()
    model.save_pretrained(tmp_path)
    return model


def _trainable(model) -> set[str]:
    return {name.replace(".default", "").removeprefix("base_model.model.")
            for name, p in model.named_parameters() if p.requires_grad}


def test_mica_adapter_trains_what_peft_trains_when_loaded_or_converted(tmp_path):
    """PEFT's MiCA init freezes lora_B. ``load_adapter(is_trainable=True)`` and ``from_peft``
    both accept such an adapter and train exactly PEFT's parameters (lora_A only), with
    PEFT's outputs; a MiCA adapter cannot be created by ``inject`` (it needs PEFT's SVD)."""
    peft_model = _mica_dir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    ours = fastpeft.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    expected = _trainable(theirs)
    assert expected and all("lora_A" in name for name in expected)
    assert _trainable(ours) == expected
    ids = token_ids()
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32, "loaded MiCA logits")
    converted = fastpeft.from_peft(peft_model)
    assert _trainable(converted) == expected
    with pytest.raises(ValueError, match="mica"):
        fastpeft.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
