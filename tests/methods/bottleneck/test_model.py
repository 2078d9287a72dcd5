"""Bottleneck adapters at the model level on the installed transformers (5.x): ``AdapterConfig``
checks, placement on BERT / Llama / GPT-2 (the hooks wrap the modules AdapterHub adapts),
training, ``save_adapter`` / ``load_adapter`` in AdapterHub's format, refusals that leave the
model unchanged, ``merge_and_unload`` / ``unload``. Exactness against AdapterHub itself is in
tests/adapterhub/ (its own environment: AdapterHub needs transformers 4.57)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft import AdapterConfig
from fastpeft.methods.bottleneck import placement as bottleneck_placement
from fastpeft.methods.bottleneck.model import placed_bottleneck

# Own tiny models (not tests.helpers.models', which needs peft): scripts/adapterhub_env.sh runs
# this file under transformers 4.57 too, where the module layout may differ.
transformers = pytest.importorskip("transformers")

PRESETS = ("seq_bn", "double_seq_bn", "par_bn")
VOCAB = 128


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=61, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def token_ids(shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))


def snapshot(model: torch.nn.Module) -> tuple:
    """What a refused call must leave alone: tensors, module types, flags, adapter state."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: type(m) for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            fastpeft.methods.state.adapter_state(model))


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    state, types, flags, adapter = snapshot(model)
    assert (types, flags, adapter) == before[1:]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(value, before[0][key]) for key, value in state.items())


MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
# Per model: (layer list, {location: (module producing h, module receiving r)}), as AdapterHub places them.
LAYOUTS = {
    "bert": ("bert.encoder.layer", {"mh_adapter": ("attention.output.dropout", "attention.output"),
                                    "output_adapter": ("output.dropout", "output")}),
    "llama": ("model.layers", {"mh_adapter": ("self_attn", "input_layernorm"),
                               "output_adapter": ("mlp", "post_attention_layernorm")}),
    "gpt2": ("transformer.h", {"mh_adapter": ("attn", "ln_1"), "output_adapter": ("mlp", "ln_2")}),
}


def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(token_ids()).logits.detach()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in placed_bottleneck(model).adapters():
            for param in adapter.parameters():
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


# --- config ---------------------------------------------------------------------------------

def test_presets_are_adapterhubs():
    seq, double, par = (AdapterConfig(p) for p in PRESETS)
    assert (seq.mh_adapter, seq.output_adapter, seq.original_ln_before, seq.non_linearity) == (False, True, True, "relu")
    assert (double.mh_adapter, double.output_adapter, double.original_ln_before, double.non_linearity) == \
        (True, True, False, "swish")
    assert (par.is_parallel, par.reduction_factor, par.scaling, par.init_weights) == (True, 2, 4.0, "mam_adapter")
    assert AdapterConfig("scaled_par_bn").scaling == "learned"
    assert AdapterConfig("houlsby") == double and AdapterConfig("pfeiffer", reduction_factor=8).reduction_factor == 8
    assert AdapterConfig.from_dict(par.to_dict()) == par
    assert AdapterConfig("seq_bn", init_weights="lora").init_weights == "mam_adapter"


def test_from_dict_reads_adapterhubs_full_config():
    data = AdapterConfig("double_seq_bn").to_dict()
    assert data["phm_layer"] is False and data["ln_before"] is False and data["scaling"] == 1.0
    data.update(phm_dim=8, adapter_residual_before_ln=True)  # no effect without phm_layer / ln_after
    assert AdapterConfig.from_dict(data) == AdapterConfig("double_seq_bn")
    with pytest.warns(UserWarning, match="newer_key"):
        AdapterConfig.from_dict({**data, "newer_key": 1})


@pytest.mark.parametrize("kwargs, match", [
    ({"original_ln_after": False}, "original_ln_after"),
    ({"scaling": "channel"}, "per-channel"),
    ({"non_linearity": "leakyrelu"}, "leakyrelu"),
    ({"residual_before_ln": "pre"}, "residual_before_ln"),
    ({"preset": "double_seq_bn", "residual_before_ln": "post_add"}, "post_add"),
    ({"reduction_factor": {"x": 2}}, "reduction_factor"),
    ({"reduction_factor": -1}, "reduction_factor"),
    ({"dropout": 1.0}, "dropout"),
    ({"init_weights": "xavier"}, "init_weights"),
    ({"leave_out": [-1]}, "leave_out"),
    ({"mh_adapter": False, "output_adapter": False}, "no adapter"),
    ({"preset": "compacter"}, "PHM"),
    ({"preset": "lora"}, "preset"),
])
def test_bad_configs_are_refused(kwargs, match):
    kwargs = {"preset": "seq_bn", **kwargs}
    with pytest.raises(ValueError, match=match):
        AdapterConfig(kwargs.pop("preset"), **kwargs)


@pytest.mark.parametrize("data, match", [
    ({"phm_layer": True}, "phm_layer"),
    ({"use_gating": True}, "use_gating"),
    ({"inv_adapter": "nice"}, "inv_adapter"),
    ({"ln_after": True}, "ln_after"),
    ({"stochastic_depth": 0.1}, "stochastic_depth"),
    ({"architecture": "union"}, "bottleneck adapters only"),
])
def test_unsupported_adapterhub_features_are_refused(data, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig.from_dict({**AdapterConfig("seq_bn").to_dict(), **data})


# --- placement --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_placement_wraps_adapterhubs_modules(kind, preset):
    model = MODELS[kind]()
    fastpeft.inject(model, AdapterConfig(preset))
    layers, sites = LAYOUTS[kind]
    config = AdapterConfig(preset)
    wanted = [loc for loc in ("mh_adapter", "output_adapter") if getattr(config, loc)]
    placed = placed_bottleneck(model)
    assert [(s.planned.layer_path, s.planned.spec.location) for s in placed.sites] == \
        [(f"{layers}.{i}", loc) for i in range(2) for loc in wanted]
    for site in placed.sites:
        output_module, residual_module = sites[site.planned.spec.location]
        layer = model.get_submodule(site.planned.layer_path)
        assert any(hook == site.adapt_output for hook in layer.get_submodule(output_module)._forward_hooks.values())
        assert any(hook == site.remember_residual
                   for hook in layer.get_submodule(residual_module)._forward_pre_hooks.values())
        assert model.get_submodule(site.planned.adapter_path) is site.adapter


@pytest.mark.parametrize("kind", MODELS)
def test_sites_see_adapterhubs_h_and_residual(kind, monkeypatch):
    """Every site gets the sublayer output ``h`` and the residual stream ``r`` AdapterHub passes:
    in a pre-LN block r is the block input (attention) or the stream after attention
    (feed-forward); in BERT, the attention block's input and the attention output."""
    model = MODELS[kind]()
    fastpeft.inject(model, AdapterConfig("double_seq_bn"))
    seen = []
    real = bottleneck_placement.BottleneckSite.sublayer_output

    def spy(site, h, r):
        out = real(site, h, r)
        seen.append((site.planned.spec.location, h, r, out))
        return out

    monkeypatch.setattr(bottleneck_placement.BottleneckSite, "sublayer_output", spy)
    layer_inputs = []
    layers = model.get_submodule(LAYOUTS[kind][0])
    hook = layers[1].register_forward_pre_hook(lambda m, args, kwargs: layer_inputs.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    model(token_ids())
    hook.remove()
    (_, h_mh, r_mh, out_mh), (_, h_out, r_out, _) = seen[2:4]  # layer 1
    assert torch.equal(r_mh, layer_inputs[0])
    if kind == "bert":
        attention_output = layers[1].attention.output.LayerNorm(out_mh + r_mh)
        assert torch.equal(r_out, attention_output)
    else:
        assert torch.equal(r_out, out_mh + r_mh)
    assert h_mh.shape == h_out.shape == r_mh.shape


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_identity_adapters_keep_logits_and_trained_ones_change_them(kind, preset):
    model = MODELS[kind]()
    base = logits(model)
    fastpeft.inject(model, AdapterConfig(preset, init_weights="mam_adapter"))
    assert torch.equal(logits(model), base)
    randomize(model)
    assert not torch.allclose(logits(model), base, atol=1e-3)
    fastpeft.unload(model)
    assert torch.equal(logits(model), base)
    assert not any("bottleneck" in name for name, _ in model.named_modules())
    assert fastpeft.methods.state.adapter_state(model) is None


def test_leave_out_and_per_layer_reduction_factor():
    model = tiny_llama()
    fastpeft.inject(model, AdapterConfig("seq_bn", leave_out=[0], reduction_factor={"1": 4, "default": 64}))
    assert [(s.planned.layer_index, s.adapter.bottleneck_size) for s in placed_bottleneck(model).sites] == [(1, 12)]


def test_training_lowers_the_loss_and_trains_only_the_adapter():
    model = tiny_llama()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    fastpeft.inject(model, AdapterConfig("double_seq_bn", scaling="learned", dropout=0.1))
    count = fastpeft.trainable_parameters(model)
    assert count.trainable == sum(p.numel() for _, a in placed_bottleneck(model).adapters() for p in a.parameters())
    model.train()
    ids = token_ids(shape=(4, 10))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")  # renamed in transformers 5
def test_gradient_checkpointing_recomputes_the_same_gradients():
    """Checkpointing reruns each layer's forward, and so the residual hooks, in the backward."""
    model = fastpeft.inject(tiny_llama(), AdapterConfig("seq_bn", init_weights="bert")).train()
    ids = token_ids()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(model(ids, labels=ids).loss, params)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for grad, want in zip(torch.autograd.grad(model(ids, labels=ids, use_cache=False).loss, params), expected):
        assert torch.equal(grad, want)


# --- refusals -------------------------------------------------------------------------------------

def test_refusals_leave_the_model_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    for config, match in [
        (AdapterConfig("seq_bn", residual_before_ln="post_add"), "post_add"),
        (AdapterConfig("seq_bn", leave_out=[0, 1]), "leave_out"),
        (AdapterConfig("seq_bn", reduction_factor={"0": 4}), "layer 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            fastpeft.inject(model, config)
        assert_unchanged(model, before)
    with pytest.raises(ValueError, match="model_type"):
        fastpeft.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), AdapterConfig("seq_bn"))


def test_one_adapter_per_model():
    model = tiny_gpt2()
    fastpeft.inject(model, AdapterConfig("seq_bn"))
    before = snapshot(model)
    for config in (AdapterConfig("par_bn"), fastpeft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True)):
        with pytest.raises(ValueError, match="already has"):
            fastpeft.inject(model, config)
    assert_unchanged(model, before)
    lora = fastpeft.inject(tiny_gpt2(), fastpeft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="already has"):
        fastpeft.inject(lora, AdapterConfig("seq_bn"))


def test_merge_and_unload_removes_only_exactly_zero_adapters():
    model = tiny_bert()
    base = logits(model)
    fastpeft.inject(model, AdapterConfig("par_bn"))  # mam_adapter init: adds exactly zero
    fastpeft.merge_and_unload(model)
    assert torch.equal(logits(model), base)
    fastpeft.inject(model, AdapterConfig("seq_bn"))
    randomize(model)
    adapted = logits(model)
    with pytest.raises(ValueError, match="not linear.*fastpeft.unload"):
        fastpeft.merge_and_unload(model)
    assert torch.equal(logits(model), adapted)


def test_unload_takes_lora_layers_out_unmerged():
    """``fastpeft.unload`` (added with bottleneck adapters, which cannot be merged) also undoes LoRA."""
    model = tiny_llama()
    base, linear = logits(model), model.model.layers[0].self_attn.q_proj
    fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.model.layers[0].self_attn.q_proj.merge()
    fastpeft.unload(model)
    assert model.model.layers[0].self_attn.q_proj is linear
    assert torch.allclose(logits(model), base, atol=1e-6)
    with pytest.raises(ValueError, match="nothing|no fastpeft"):
        fastpeft.unload(model)


# --- files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, config", [
    ("bert", AdapterConfig("double_seq_bn", scaling="learned")),
    ("llama", AdapterConfig("par_bn", non_linearity="gelu")),
])
def test_save_load_round_trip(tmp_path, kind, config):
    model = fastpeft.inject(MODELS[kind](), config)
    randomize(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)  # adapter-only: AdapterHub's files and the Trainer copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                          "model.safetensors"]
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["name"] == "default" and data["model_type"] == kind and data["config"] == config.to_dict()
    keys = safetensors.torch.load_file(tmp_path / "adapter.safetensors").keys()
    layer = LAYOUTS[kind][0]
    prefix = {"bert": f"{layer}.0.attention.output.adapters.default.",
              "llama": f"{layer}.0.output_adapters.adapters.default."}[kind]
    assert f"{prefix}adapter_down.0.weight" in keys and f"{prefix}adapter_up.bias" in keys
    loaded = fastpeft.load_adapter(MODELS[kind](), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert fastpeft.trainable_parameters(loaded).trainable == 0
    assert fastpeft.api.adapter_state_dict(loaded).keys() == keys


def test_pickled_weights_need_allow_pickle(tmp_path):
    model = fastpeft.inject(tiny_gpt2(), AdapterConfig("seq_bn"))
    randomize(model)
    fastpeft.save_adapter(model, tmp_path)
    torch.save(safetensors.torch.load_file(tmp_path / "adapter.safetensors"), tmp_path / "pytorch_adapter.bin")
    (tmp_path / "adapter.safetensors").unlink()
    fresh = tiny_gpt2()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="allow_pickle"):
        fastpeft.load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)
    fastpeft.load_adapter(fresh, tmp_path, allow_pickle=True)
    assert torch.equal(logits(fresh), logits(model))


def _break(directory, how: str) -> None:
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter.safetensors"
    data = json.loads(config_path.read_text())
    tensors = safetensors.torch.load_file(weights_path)
    if how == "corrupt weights":
        weights_path.write_bytes(b"not safetensors")
    elif how == "missing key":
        safetensors.torch.save_file(dict(list(tensors.items())[1:]), weights_path)
    elif how == "wrong shape":
        key = next(iter(tensors))
        safetensors.torch.save_file({**tensors, key: torch.zeros(3, 3)}, weights_path)
    elif how == "phm":
        data["config"]["phm_layer"] = True
    elif how == "other method":
        data["config"] = {"architecture": "prefix_tuning"}
    elif how == "other model":
        data["model_type"] = "bert"
    elif how == "fusion":
        (directory / "adapter_fusion_config.json").write_text("{}")
    elif how == "no name":
        del data["name"]
    config_path.write_text(json.dumps(data))


@pytest.mark.parametrize("how, match", [
    ("corrupt weights", "safetensors"), ("missing key", "missing keys"), ("wrong shape", "shape"),
    ("phm", "phm_layer"), ("other method", "bottleneck adapters only"), ("other model", "model_type"),
    ("fusion", "AdapterFusion"), ("no name", "name"),
])
def test_bad_directories_are_refused_and_the_model_is_unchanged(tmp_path, how, match):
    model = fastpeft.inject(tiny_llama(), AdapterConfig("double_seq_bn"))
    fastpeft.save_adapter(model, tmp_path)
    _break(tmp_path, how)
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        fastpeft.load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model))],
                         ids=["deepcopy", "pickle"])
def test_copy_of_an_adapted_model_is_independent(duplicate):
    model = fastpeft.inject(tiny_llama(), AdapterConfig("seq_bn"))
    randomize(model)
    logits(model)  # the sites have run (their per-thread residuals are not part of a copy)
    clone = duplicate(model)
    expected = logits(clone)
    assert torch.equal(expected, logits(model))
    randomize(model, seed=1)
    assert torch.equal(logits(clone), expected)
    fastpeft.unload(clone)
    assert not torch.allclose(logits(model), logits(clone))
