"""fastpeft against AdapterHub's own library (``adapters`` 1.3.0, transformers 4.57.6): its
bottleneck adapters, saved by it, loaded by fastpeft compute the same logits and gradients
(fp32, 1e-5 relative), and fastpeft's saved adapters load back into AdapterHub.

Runs in its own environment (``scripts/adapterhub_env.sh``); skipped where ``adapters`` is
not installed (fastpeft's main environment has transformers 5, which AdapterHub does not
support).
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.formats.adapterhub import PARAMETERS, SCALING_KEY  # noqa: E402
from fastpeft.methods.bottleneck.model import placed_bottleneck  # noqa: E402
from tests.helpers.numerics import assert_close  # noqa: E402

VOCAB = 64
NAME = "hub"  # the adapter's name in AdapterHub


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tiny_roberta(xlm: bool = False) -> torch.nn.Module:
    kind = "XLMRoberta" if xlm else "Roberta"
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=40, pad_token_id=1, num_labels=2)
    return getattr(transformers, f"{kind}ForSequenceClassification")(config)


def tiny_mistral() -> torch.nn.Module:
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)
    return transformers.MistralForCausalLM(config)


MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2, "roberta": tiny_roberta,
          "xlm-roberta": lambda: tiny_roberta(xlm=True), "mistral": tiny_mistral}

# (model, AdapterHub preset, overrides): every preset on every model, and the variants.
CASES = [
    *[(model, preset, {}) for model in ("bert", "llama", "gpt2") for preset in ("seq_bn", "double_seq_bn", "par_bn")],
    ("roberta", "seq_bn", {}),  # the other model types fastpeft knows the layouts of
    ("xlm-roberta", "par_bn", {}),
    ("mistral", "double_seq_bn", {}),
    ("bert", "scaled_par_bn", {}),
    ("llama", "scaled_par_bn", {}),
    ("bert", "seq_bn", {"residual_before_ln": False, "non_linearity": "gelu"}),
    ("bert", "seq_bn", {"residual_before_ln": "post_add"}),
    ("llama", "seq_bn", {"residual_before_ln": False, "non_linearity": "gelu_new"}),
    ("gpt2", "double_seq_bn", {"scaling": 0.5, "non_linearity": "relu", "leave_out": [0]}),
    ("bert", "double_seq_bn", {"reduction_factor": {"0": 4, "default": 8}, "scaling": "learned"}),
]


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().eval()


def _hub_model(base: torch.nn.Module, preset: str, overrides: dict) -> torch.nn.Module:
    """``base`` with an AdapterHub adapter of random (non-zero) weights, active."""
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.add_adapter(NAME, config=adapters.AdapterConfig.load(preset, **overrides), set_active=True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, param in hub.named_parameters():
            if f".adapters.{NAME}." in key:
                param.copy_(0.5 + 0.2 * torch.randn(param.shape, generator=generator) if key.endswith(SCALING_KEY)
                            else 0.3 * torch.randn(param.shape, generator=generator))
    hub.requires_grad_(False)
    for key, param in hub.named_parameters():
        param.requires_grad_(f".adapters.{NAME}." in key)
    return hub.eval()


def _inputs(model: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    """Input embeddings (so that their gradient, dL/dh through every adapter, can be compared)."""
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    return model.get_input_embeddings()(ids).detach().requires_grad_(True)


def _run(model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, d loss / d embeds)`` for a fixed random loss weighting."""
    logits = model(inputs_embeds=embeds).logits
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11))
    (logits * weight).sum().backward()
    return logits.detach(), embeds.grad


def _our_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters under AdapterHub's keys."""
    placed = placed_bottleneck(model)
    out = {}
    for site in placed.sites:
        prefix = site.planned.hub_prefix(placed.name)
        for suffix, (module, param) in PARAMETERS.items():
            out[prefix + suffix] = getattr(getattr(site.adapter, module), param)
        if site.adapter.learned_scaling:
            out[prefix + SCALING_KEY] = site.adapter.scaling
    return out


def _compare(ours: torch.nn.Module, hub: torch.nn.Module) -> None:
    logits, grad = _run(ours, _inputs(ours))
    hub_logits, hub_grad = _run(hub, _inputs(hub))
    assert_close(logits, hub_logits, torch.float32, "logits")
    assert_close(grad, hub_grad, torch.float32, "d loss / d input embeddings")
    hub_params = {k: p for k, p in hub.named_parameters() if f".adapters.{NAME}." in k}
    our_params = _our_params(ours)
    assert our_params.keys() == hub_params.keys()
    for key, param in our_params.items():
        assert_close(param.grad, hub_params[key].grad, torch.float32, f"grad of {key}")


@pytest.mark.parametrize("kind, preset, overrides", CASES)
def test_adapterhub_saved_adapter_runs_the_same_in_fastpeft(tmp_path, kind, preset, overrides):
    base = _model(kind)
    hub = _hub_model(base, preset, overrides)
    hub.save_adapter(str(tmp_path), NAME, use_safetensors=True)
    with pytest.warns(UserWarning, match="prediction head"):  # AdapterHub saves the model's static head too
        ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    _compare(ours, hub)
    # the base model's output is unchanged by the placement itself
    base_logits = base(inputs_embeds=_inputs(base)).logits
    fastpeft.unload(ours)
    assert torch.equal(ours(inputs_embeds=_inputs(ours)).logits, base_logits)


@pytest.mark.parametrize("kind, preset, overrides", [
    ("bert", "seq_bn", {}), ("llama", "double_seq_bn", {"scaling": "learned"}), ("gpt2", "par_bn", {}),
])
def test_fastpeft_saved_adapter_loads_into_adapterhub(tmp_path, kind, preset, overrides):
    base = _model(kind)
    ours = fastpeft.inject(copy.deepcopy(base), fastpeft.AdapterConfig(preset, **overrides))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in _our_params(ours).values():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    fastpeft.save_adapter(ours, tmp_path)
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.load_adapter(str(tmp_path), use_safetensors=True, set_active=True)
    hub.eval()
    assert hub.adapters_config.adapters.keys() == {"default"}
    assert_close(hub(inputs_embeds=_inputs(hub)).logits, ours(inputs_embeds=_inputs(ours)).logits.detach(),
                 torch.float32, "logits")


def test_a_bare_model_adapter_loads_into_a_model_with_a_head(tmp_path):
    """AdapterHub's keys have the base-model prefix (``bert.``) or not, depending on the class."""
    base = _model("bert")
    hub_bare = _hub_model(base.bert, "double_seq_bn", {})
    hub_bare.save_adapter(str(tmp_path), NAME, use_safetensors=True)
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.load_adapter(str(tmp_path), use_safetensors=True, set_active=True)
    hub.eval()
    assert_close(ours(inputs_embeds=_inputs(ours)).logits.detach(), hub(inputs_embeds=_inputs(hub)).logits.detach(),
                 torch.float32, "logits")


def test_pickled_adapter_needs_allow_pickle(tmp_path):
    base = _model("llama")
    hub = _hub_model(base, "seq_bn", {})
    hub.save_adapter(str(tmp_path), NAME)  # pytorch_adapter.bin
    with pytest.raises(ValueError, match="allow_pickle"):
        fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.warns(UserWarning, match="prediction head"):
        ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path, allow_pickle=True, is_trainable=True)
    _compare(ours, hub)


@pytest.mark.parametrize("init", ["bert", "mam_adapter", "houlsby"])
def test_seeded_inits_are_adapterhubs(init):
    base = _model("bert")
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.add_adapter(NAME, config=adapters.AdapterConfig.load("double_seq_bn", init_weights=init, init_weights_seed=3))
    ours = fastpeft.inject(copy.deepcopy(base), fastpeft.AdapterConfig("double_seq_bn", init_weights=init,
                                                                       init_weights_seed=3))
    hub_params = {k: p for k, p in hub.named_parameters() if f".adapters.{NAME}." in k}
    for key, param in _our_params(ours).items():
        expected = hub_params[key.replace(".default.", f".{NAME}.")]
        assert torch.equal(param, expected), key


@pytest.mark.parametrize("config, message", [
    (adapters.AdapterConfig.load("compacter", reduction_factor=4), "phm_layer"),  # PHM needs R % phm_dim == 0
    ("seq_bn_inv", "inv_adapter"),
    ({"architecture": None, "mh_adapter": False, "output_adapter": True, "reduction_factor": 16,
      "non_linearity": "relu", "use_gating": True}, "use_gating"),
    ("lora", "bottleneck adapters only"),
    ("prefix_tuning", "bottleneck adapters only"),
])
def test_unsupported_adapterhub_features_are_refused(tmp_path, config, message):
    base = _model("bert")
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.add_adapter(NAME, config=config)
    # prefix tuning's shared tensors cannot go to safetensors; the config is refused before the weights are read
    hub.save_adapter(str(tmp_path), NAME, use_safetensors=not (isinstance(config, str) and config == "prefix_tuning"))
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fastpeft.load_adapter(model, tmp_path)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapter_fusion_directory_is_refused(tmp_path):
    base = _model("bert")
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.add_adapter("a", config="seq_bn")
    hub.add_adapter("b", config="seq_bn")
    hub.add_adapter_fusion(adapters.composition.Fuse("a", "b"))
    hub.save_adapter_fusion(str(tmp_path), "a,b", use_safetensors=True)
    hub.save_adapter(str(tmp_path), "a", use_safetensors=True)
    with pytest.raises(ValueError, match="AdapterFusion"):
        fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
