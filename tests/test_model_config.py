"""LoraConfig: PEFT's defaults and field names, validation naming the field, and
adapter_config.json compatibility both ways (what PEFT writes, what PEFT reads)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from fastpeft import LoraConfig

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
    ("use_dora", True), ("lora_bias", True), ("layer_replication", [[0, 1]]), ("target_parameters", ["w"]),
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


@pytest.mark.parametrize("key,value", [("use_dora", True), ("lora_bias", True), ("use_qalora", True)])
def test_constructor_refuses_unimplemented_features_like_the_load_path(key, value):
    """``LoraConfig(use_dora=True)`` says what ``load_adapter`` says of such a config."""
    with pytest.raises(ValueError, match=f"{key}=True: .* not implemented in fastpeft"):
        LoraConfig(target_modules=["q_proj"], **{key: value})


def test_constructor_takes_peft_only_keys_when_unset_or_metadata():
    """Code written for ``peft.LoraConfig`` runs: unset features and metadata are accepted."""
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=False, inference_mode=False, peft_type="LORA")
    assert config == LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_alfa'"):
        LoraConfig(lora_alfa=16)
