"""LoraConfig: PEFT's defaults and field names, validation naming the field, and
adapter_config.json compatibility both ways (what PEFT writes, what PEFT reads)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings

import pytest
import torch.nn as nn

from fastpeft import LoraConfig, inject
from fastpeft.methods.lora.targets import is_targeted

peft = pytest.importorskip("peft")

SHARED_FIELDS = [f.name for f in dataclasses.fields(LoraConfig)]


def test_defaults_and_field_names_are_peft_s():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in SHARED_FIELDS:
        assert hasattr(theirs, name), name
        expected = getattr(theirs, name)
        assert getattr(ours, name) == expected, name


@pytest.mark.parametrize("kwargs,exc,field", [
    (dict(r=0), ValueError, "r"),
    (dict(r=2.0), TypeError, "r"),
    (dict(r=True), TypeError, "r"),
    (dict(lora_alpha="16"), TypeError, "lora_alpha"),
    (dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(target_modules=5), TypeError, "target_modules"),
    (dict(target_modules=["q_proj", 3]), TypeError, "target_modules"),
    (dict(target_modules="(q_proj"), ValueError, "target_modules"),
    (dict(exclude_modules="[bad"), ValueError, "exclude_modules"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="(layers"), ValueError,
     "layers_pattern"),
    (dict(modules_to_save=["lm_head", "score["]), ValueError, "modules_to_save"),
    (dict(bias="all"), ValueError, "bias"),
    (dict(bias="lora_only"), ValueError, "bias"),
    (dict(bias="some"), ValueError, "bias"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
    (dict(fan_in_fan_out=1), TypeError, "fan_in_fan_out"),
    (dict(rank_pattern={"q_proj": 0}), ValueError, "rank_pattern"),
    (dict(rank_pattern=[("q_proj", 4)]), TypeError, "rank_pattern"),
    (dict(alpha_pattern={"q_proj": "x"}), TypeError, "alpha_pattern"),
    (dict(alpha_pattern={"(": 4}), ValueError, "alpha_pattern"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), ValueError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform=[-1]), ValueError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform="0"), TypeError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), ValueError, "layers_pattern"),
    (dict(modules_to_save="lm_head"), TypeError, "modules_to_save"),
    (dict(init_lora_weights=1.5), TypeError, "init_lora_weights"),
    (dict(task_type="CLASSIFY"), ValueError, "task_type"),
])
def test_bad_values_name_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=rf"LoraConfig\.{field}\b"):
        LoraConfig(**kwargs)


def test_normalised_and_frozen():
    config = LoraConfig(target_modules=["v_proj", "q_proj", "v_proj"], modules_to_save={"score", "classifier"},
                        task_type=peft.TaskType.CAUSAL_LM)
    assert config.target_modules == ("v_proj", "q_proj")
    assert config.modules_to_save == ("classifier", "score")
    assert config.task_type == "CAUSAL_LM" and type(config.task_type) is str
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 16
    assert dataclasses.replace(config, r=16).r == 16
    assert LoraConfig(target_modules="ALL-Linear").is_all_linear


FULL = dict(
    r=6, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.q_proj"],
    use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\..*": 3.5},
    layers_to_transform=[0, 1], layers_pattern="layers", modules_to_save=["lm_head"], init_lora_weights="gaussian",
    task_type="CAUSAL_LM", base_model_name_or_path="some/model",
)


def _comparable(config_dict: dict) -> dict:
    """Field values with PEFT's sets as sorted lists and ours' tuples as lists."""
    out = {}
    for name in SHARED_FIELDS:
        value = config_dict[name]
        out[name] = sorted(value) if isinstance(value, (set, list, tuple)) else value
    return out


def test_reads_what_peft_writes():
    theirs = peft.LoraConfig(**FULL).to_dict()
    ours = LoraConfig.from_dict(theirs)
    assert _comparable(ours.to_dict()) == _comparable(theirs)


def test_peft_reads_what_we_write_without_warnings():
    data = LoraConfig(**FULL).to_dict()
    assert data["peft_type"] == "LORA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.LoraConfig.from_peft_type(**data)
    assert isinstance(theirs, peft.LoraConfig)
    assert _comparable(theirs.to_dict()) == _comparable(data)


@pytest.mark.parametrize("key,value", [
    ("lora_bias", True), ("layer_replication", [[0, 1]]), ("target_parameters", ["w"]),
    ("trainable_token_indices", [1, 2]), ("alora_invocation_tokens", [5]), ("use_qalora", True),
    ("megatron_config", {"x": 1}), ("ensure_weight_tying", True), ("kasa_config", {"a": 1}),
])
def test_features_that_change_the_math_are_refused(key, value):
    data = peft.LoraConfig(target_modules=["q_proj"]).to_dict()
    LoraConfig.from_dict(data)  # unset, they are accepted
    data[key] = value
    with pytest.raises(ValueError, match=key):
        LoraConfig.from_dict(data)


def test_creation_only_and_metadata_keys_are_accepted():
    data = peft.LoraConfig(target_modules=["q_proj"]).to_dict()
    data.update(init_lora_weights="pissa", loftq_config={"loftq_bits": 4}, eva_config={"rho": 2.0},
                inference_mode=True, revision="main", peft_version="9.9.9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = LoraConfig.from_dict(data)
    assert config.init_lora_weights == "pissa"


def test_unknown_keys_tolerated_and_reported_when_set():
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "future_off": None, "future_knob": 3}
    with pytest.warns(UserWarning, match="future_knob") as record:
        config = LoraConfig.from_dict(data)
    assert "future_off" not in str(record[0].message)
    assert config.r == 4


@pytest.mark.parametrize("data,exc,match", [
    ({"peft_type": "IA3", "target_modules": ["q"]}, ValueError, "peft_type"),
    ({"peft_type": "PREFIX_TUNING"}, ValueError, "peft_type"),
    ([("r", 4)], TypeError, "dict"),
    ({"peft_type": "LORA", "r": "8"}, TypeError, r"LoraConfig\.r"),
])
def test_from_dict_errors(data, exc, match):
    with pytest.raises(exc, match=match):
        LoraConfig.from_dict(data)


@pytest.mark.parametrize("key,value", [("lora_bias", True), ("use_qalora", True)])
def test_constructor_refuses_unimplemented_features_like_the_load_path(key, value):
    """``LoraConfig(lora_bias=True)`` says what ``load_adapter`` says of such a config."""
    with pytest.raises(ValueError, match=f"{key}=True: .* not implemented in fastpeft"):
        LoraConfig(target_modules=["q_proj"], **{key: value})


def test_use_dora_is_a_field_saved_as_peft_saves_it():
    """DoRA's switch is a field (PEFT's name), a bool, saved and read back; PEFT reads it."""
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    data = config.to_dict()
    assert data["use_dora"] is True and LoraConfig.from_dict(data) == config
    assert peft.LoraConfig.from_peft_type(**data).use_dora is True
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        LoraConfig(target_modules=["q_proj"], use_dora=1)


def test_constructor_takes_peft_only_keys_when_unset_or_metadata():
    """Code written for ``peft.LoraConfig`` runs: unset features and metadata are accepted."""
    config = LoraConfig(r=4, target_modules=["q_proj"], lora_bias=False, inference_mode=False, peft_type="LORA")
    assert config == LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_alfa'"):
        LoraConfig(lora_alfa=16)


# Regexes that backtrack exponentially on a long module path that does not match: a variable
# repeat or an alternation inside a repeat. Each runs ``re.fullmatch`` on ``LONG_PATH`` for
# longer than anyone waits (more than 3 s measured for each, exponential in the path's length).
CATASTROPHIC = ["(a+)+b", "(.*a){25}", "(a|a)*b", "(a?){25}a{25}", r"(\w+)*\.q_proj"]
LONG_PATH = "a" * 40 + "_proj"
# PEFT-style regexes that must pass, with a module path each fully matches: repeats side by
# side (``.*decoder.*...``) cost a power of the path's length, not an exponential.
ORDINARY = {
    r".*\.(q_proj|v_proj)": "model.layers.0.self_attn.q_proj",
    r".*(q|k|v)_proj$": "model.layers.0.self_attn.k_proj",
    r"model\.layers\.\d+\.self_attn\.(q|v)_proj": "model.layers.11.self_attn.v_proj",
    r"^(?!.*lm_head).*proj$": "model.layers.0.mlp.up_proj",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$": "decoder.block.0.layer.1.EncDecAttention.q",
    r"(?:model\.)?layers\.[0-9]+\.(?:attn|mlp)\.[a-z_]+": "model.layers.3.mlp.down_proj",
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_target_regex_is_refused_before_the_model_is_touched(pattern):
    """A target regex that would hang matching ``LONG_PATH`` (as it hangs PEFT) is a
    ValueError naming the field, the pattern and why, raised at once by the config: reading
    it from an adapter_config.json refuses it before ``inject`` sees the model."""
    model = nn.ModuleDict({LONG_PATH: nn.Linear(4, 4)})
    text = json.dumps({"peft_type": "LORA", "r": 2, "target_modules": pattern})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"LoraConfig\.target_modules: .*backtrack exponentially") as info:
        inject(model, LoraConfig.from_dict(json.loads(text)))
    assert time.perf_counter() - start < 1.0
    assert repr(pattern) in str(info.value)
    assert type(model[LONG_PATH]) is nn.Linear


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kwargs,field", [
    (dict(exclude_modules="(.*a){25}"), "exclude_modules"),
    (dict(rank_pattern={"(a+)+": 4}), "rank_pattern['(a+)+']"),
    (dict(alpha_pattern={"(proj|pro|j)+x": 4}), "alpha_pattern['(proj|pro|j)+x']"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="(h+)+"), "layers_pattern"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["h", "(h+)+"]), "layers_pattern[1]"),
    (dict(modules_to_save=["lm_head", "(head+)*"]), "modules_to_save[1]"),
])
def test_catastrophic_regex_in_every_regex_field_is_refused(kwargs, field):
    """Every field PEFT's matching reads as a regex (or puts into one) is checked, in the
    regex it is matched with."""
    with pytest.raises(ValueError, match=rf"LoraConfig\.{re.escape(field)}: .*backtrack exponentially"):
        LoraConfig.from_dict({"peft_type": "LORA", **kwargs})


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_peft_regexes_are_accepted(pattern):
    """Ordinary PEFT regexes pass in any field that takes a regex, and target the module path
    they match in PEFT."""
    path = ORDINARY[pattern]
    assert LoraConfig(exclude_modules=pattern, rank_pattern={pattern: 4}, alpha_pattern={pattern: 2}).rank_pattern
    config = LoraConfig(target_modules=pattern)
    assert is_targeted(config, config.target_modules, path)
    assert peft.tuners.tuners_utils.check_target_module_exists(peft.LoraConfig(target_modules=pattern), path)


def test_ordinary_layer_and_modules_to_save_names_are_accepted():
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["h", "layers"],
                        modules_to_save=["lm_head", "classifier.dense"])
    assert config.layers_pattern == ("h", "layers")
    assert config.modules_to_save == ("lm_head", "classifier.dense")


def test_peft_config_with_catastrophic_regex_is_refused_on_load():
    """PEFT itself accepts the regex (and would hang on it); reading its config refuses it."""
    data = peft.LoraConfig(target_modules="(a+)+b").to_dict()
    with pytest.raises(ValueError, match=r"LoraConfig\.target_modules: the regular expression '\(a\+\)\+b'"):
        LoraConfig.from_dict(data)
