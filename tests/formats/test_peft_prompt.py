"""Prompt-tuning / prefix-tuning adapters in PEFT's files, both ways, ``from_peft``, and the
configurations and files fastpeft refuses (leaving the model unchanged)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch
from tests.helpers.models import assert_unchanged, snapshot
from tests.helpers.numerics import assert_close
from tests.helpers.prompts import MODELS, N_VIRTUAL, configs, padded_batch, pair, peft, tiny_bert_cls

import fastpeft
from fastpeft.methods.prompt.model import prompt_encoder

F32 = torch.float32


def _logits(model, seed=2):
    ids, mask, _ = padded_batch(seed=seed)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_mlp", "ptuning_lstm"])
def test_fastpeft_save_loads_in_peft_and_back(tmp_path, method):
    """save_adapter -> PeftModel.from_pretrained and fastpeft.load_adapter: same logits; the
    file holds PEFT's keys (a projected prefix as its computed prefix)."""
    base = MODELS["llama"]()
    ours = fastpeft.inject(copy.deepcopy(base), configs(method)[1])
    with torch.no_grad():
        for p in prompt_encoder(ours).parameters():
            p.add_(torch.randn_like(p))  # trained-looking weights
    expected = _logits(ours)
    fastpeft.save_adapter(ours, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].dtype == F32
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"prompt": "PROMPT_TUNING", "ptuning_lstm": "P_TUNING"}.get(method, "PREFIX_TUNING")
    assert saved["inference_mode"] is True and saved["num_layers"] == 2

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_close(_logits(theirs), expected, F32, "PEFT loading fastpeft's adapter")
    back = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(_logits(back), expected, F32, "fastpeft loading its adapter")
    assert not any(p.requires_grad for p in back.parameters())


@pytest.mark.parametrize("method", ["prompt", "prefix_mlp", "ptuning_mlp"])
def test_peft_save_loads_in_fastpeft(tmp_path, method):
    """A PEFT directory (GPT-2) loads frozen, or trainable where PEFT's file allows it."""
    base = MODELS["gpt2"]()
    theirs = peft.get_peft_model(copy.deepcopy(base), configs(method)[0])
    theirs.save_pretrained(tmp_path)
    expected = _logits(theirs)
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(_logits(ours), expected, F32, "fastpeft loading PEFT's adapter")
    assert fastpeft.trainable_parameters(ours).trainable == 0
    if method == "prompt":
        trainable = fastpeft.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
        assert fastpeft.trainable_parameters(trainable).trainable == N_VIRTUAL * 64
    else:  # the MLP is not in PEFT's file: refused, model untouched
        model = copy.deepcopy(base)
        before = snapshot(model)
        with pytest.raises(ValueError, match="cannot be loaded trainable"):
            fastpeft.load_adapter(model, tmp_path, is_trainable=True)
        assert_unchanged(model, before)
        assert "forward" not in model.__dict__


def test_seq_cls_head_round_trip(tmp_path):
    """BERT SEQ_CLS: the trained classifier copy is saved under PEFT's keys, both ways."""
    theirs, ours = pair(tiny_bert_cls(), "prompt", task_type="SEQ_CLS")
    with torch.no_grad():
        ours.classifier.weight.add_(1.0)
    expected = _logits(ours)
    fastpeft.save_adapter(ours, tmp_path / "ours")
    keys = set(safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs.save_pretrained(tmp_path / "theirs")
    assert keys == set(safetensors.torch.load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "ours")
    assert_close(_logits(loaded), expected, F32, "PEFT loading the SEQ_CLS adapter")
    assert_close(_logits(fastpeft.load_adapter(tiny_bert_cls(), tmp_path / "ours")), expected, F32, "fastpeft")
    from_theirs = fastpeft.load_adapter(tiny_bert_cls(), tmp_path / "theirs")  # PEFT lists the heads twice
    assert_close(_logits(from_theirs), _logits(theirs), F32, "fastpeft loading PEFT's SEQ_CLS adapter")


@pytest.mark.parametrize("method", ["prompt", "prefix_mlp", "ptuning_mlp"])
def test_from_peft(tmp_path, method):
    """from_peft shares PEFT's parameters, keeps the logits and gradients' target, and the
    PEFT wrapper then runs the converted model (virtual tokens added once) and saves it."""
    theirs, _ = pair(MODELS["llama"](), method)
    expected = _logits(theirs)
    peft_params = {id(p) for p in theirs.prompt_encoder["default"].parameters()}
    ours = fastpeft.from_peft(theirs)
    assert {id(p) for p in prompt_encoder(ours).parameters()} == peft_params
    assert_close(_logits(ours), expected, F32, "converted")
    assert_close(_logits(theirs), expected, F32, "PEFT wrapper after from_peft")
    theirs.save_pretrained(tmp_path)
    assert_close(_logits(fastpeft.load_adapter(MODELS["llama"](), tmp_path)), expected, F32, "saved by the wrapper")
    with pytest.raises(RuntimeError, match="from_peft"):
        theirs.set_adapter("default")
    # the options save_adapter cannot honour raise (as for a converted LoRA wrapper), not ignored
    for options in ({"safe_serialization": False}, {"selected_adapters": ["other"]}, {"max_shard_size": "1GB"}):
        with pytest.raises(ValueError, match="save_pretrained"):
            theirs.save_pretrained(tmp_path / "refused", **options)
    assert not (tmp_path / "refused").exists()


def test_unsupported_prompt_types_and_files_are_refused(tmp_path):
    base = MODELS["gpt2"]()
    ours = fastpeft.inject(copy.deepcopy(base), configs("prompt")[1])
    fastpeft.save_adapter(ours, tmp_path / "multitask")
    config_path = tmp_path / "multitask" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "MULTITASK_PROMPT_TUNING"}))
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="MULTITASK_PROMPT_TUNING.*not implemented"):
        fastpeft.load_adapter(model, tmp_path / "multitask")
    # a prefix file of the wrong shape, and a config of another model's depth
    ours = fastpeft.inject(copy.deepcopy(base), configs("prefix")[1])
    fastpeft.save_adapter(ours, tmp_path / "prefix")
    weights = tmp_path / "prefix" / "adapter_model.safetensors"
    safetensors.torch.save_file({"prompt_embeddings": torch.zeros(N_VIRTUAL, 7)}, weights)
    with pytest.raises(ValueError, match="has shape"):
        fastpeft.load_adapter(model, tmp_path / "prefix")
    config_path = tmp_path / "prefix" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_layers": 5}))
    with pytest.raises(ValueError, match="num_layers"):
        fastpeft.load_adapter(model, tmp_path / "prefix")
    assert_unchanged(model, before)
    assert "forward" not in model.__dict__


PROMPT, PREFIX = fastpeft.PromptTuningConfig, fastpeft.PrefixTuningConfig
CAUSAL = {"task_type": "CAUSAL_LM", "num_virtual_tokens": N_VIRTUAL}


@pytest.mark.parametrize("config, match", [
    (lambda: PROMPT(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VIRTUAL), "task_type must be one of"),
    (lambda: PROMPT(**CAUSAL, num_transformer_submodules=2), "encoder-decoder"),
    (lambda: PROMPT(**CAUSAL, prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
    (lambda: PROMPT(**CAUSAL, token_dim=48), "token_dim=48"),
    (lambda: PREFIX(**CAUSAL, num_attention_heads=3), "heads"),
    (lambda: PREFIX(**CAUSAL, init_weights="ones"), "init_weights"),
    (lambda: PREFIX(task_type="CAUSAL_LM", num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: PREFIX(task_type="CAUSAL_LM"), "num_virtual_tokens must be set"),
])
def test_bad_configs_raise_and_leave_the_model(config, match):
    model = MODELS["gpt2"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastpeft.inject(model, config())
    assert_unchanged(model, before)
    assert "forward" not in model.__dict__


def test_prefix_tuning_refuses_gradient_checkpointing():
    model = MODELS["llama"]()
    model.gradient_checkpointing_enable()
    before = snapshot(model)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fastpeft.inject(model, configs("prefix")[1])
    assert_unchanged(model, before)


def test_one_adapter_per_model():
    model = fastpeft.inject(MODELS["gpt2"](), configs("prompt")[1])
    with pytest.raises(ValueError, match="already has a fastpeft PROMPT_TUNING adapter"):
        fastpeft.inject(model, configs("prefix")[1])
    with pytest.raises(ValueError, match="already has"):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["c_attn"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = fastpeft.inject(MODELS["gpt2"](), fastpeft.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already has fastpeft LoRA layers"):
        fastpeft.inject(lora, configs("prompt")[1])


def test_unload_gives_the_base_model_back():
    base = MODELS["llama"]()
    expected = _logits(base)
    model = fastpeft.inject(copy.deepcopy(base), configs("prefix_mlp")[1])
    with pytest.raises(ValueError, match="cannot be merged"):
        fastpeft.merge_and_unload(model)
    assert fastpeft.unload(model) is model
    assert "forward" not in model.__dict__ and "prepare_inputs_for_generation" not in model.__dict__
    assert_close(_logits(model), expected, F32, "unloaded")
    assert model.state_dict().keys() == base.state_dict().keys()
    fastpeft.inject(model, configs("prompt")[1])  # a new adapter can go on


def test_save_during_training_writes_the_inference_prompts(tmp_path):
    """A P-tuning LSTM encoder with dropout (PEFT's MLP encoder has none) saved while training,
    as Trainer's checkpoints are, writes the prompts it computes in eval mode, and the model
    stays in training mode."""
    base = MODELS["llama"]()
    ours = fastpeft.inject(copy.deepcopy(base), configs("ptuning_lstm", encoder_dropout=0.5)[1])
    ours.train()
    fastpeft.save_adapter(ours, tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    encoder = prompt_encoder(ours)
    assert encoder.training
    encoder.eval()
    with torch.no_grad():
        expected = encoder.prompts().float()
    torch.testing.assert_close(saved, expected.cpu(), rtol=0, atol=0)
    encoder.train()
    with torch.no_grad():
        assert not torch.equal(encoder.prompts().float().cpu(), saved)  # training mode draws dropout
