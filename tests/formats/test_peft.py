"""save_adapter / load_adapter / from_peft against HF PEFT itself: PEFT loads what we save and
we load what PEFT saves (equal outputs), from_peft gives equal outputs and gradients, bad
files leave the model unchanged, pickles are refused by default. What a save does to the
directory it writes (crashes, concurrency, other files, permissions): tests/formats/test_safe_write.py."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft import LoraConfig
from fastpeft.methods.lora.model import lora_layers
from tests.helpers.models import TinyNet, assert_unchanged, forward, peft, snapshot, tiny_gpt2, tiny_llama
from tests.helpers.numerics import assert_close, relative_error

CASES = {
    "llama": (tiny_llama, dict(
        r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"], use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, task_type="CAUSAL_LM",
    )),
    "gpt2": (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, layers_to_transform=[1])),
    "tinynet": (TinyNet, dict(r=3, target_modules=r"blocks\.[01]\.(proj|gate)", exclude_modules=["blocks.1.gate"])),
}
WEIGHTS = "adapter_model.safetensors"


def peft_model(make, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()


def peft_load(make, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make(), directory).eval()


@torch.no_grad()
def perturb(module: torch.nn.Module) -> None:
    """Make trained-looking weights (a modules_to_save copy starts equal to the base)."""
    for p in module.parameters():
        p.add_(0.1 * torch.randn_like(p))


def assert_adapter_matters(adapted: torch.Tensor, make) -> None:
    base = forward(make())
    assert relative_error(adapted, base) > 1e-3, "the adapter does not change the output: the test would be vacuous"


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_what_we_save(case, tmp_path):
    make, kwargs = CASES[case]
    ours = fastpeft.inject(make(), LoraConfig(init_lora_weights=False, **kwargs))
    if "modules_to_save" in kwargs:
        perturb(ours.lm_head)
    fastpeft.save_adapter(ours, tmp_path / "adapter")
    theirs = peft_load(make, tmp_path / "adapter")
    expected = forward(ours)
    assert_adapter_matters(expected, make)
    assert_close(forward(theirs), expected, torch.float32, "PEFT's logits with our adapter")
    with safetensors.safe_open(tmp_path / "adapter" / WEIGHTS, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("case", CASES)
def test_we_load_what_peft_saves(case, tmp_path):
    make, kwargs = CASES[case]
    theirs = peft_model(make, **kwargs)
    if "modules_to_save" in kwargs:
        perturb(theirs.base_model.model.lm_head.modules_to_save["default"])
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(make(), tmp_path)
    expected = forward(theirs)
    assert_adapter_matters(expected, make)
    assert_close(forward(ours), expected, torch.float32, "our logits with PEFT's adapter")
    assert not any(p.requires_grad for p in ours.parameters())  # PEFT's is_trainable=False
    trainable = fastpeft.load_adapter(make(), tmp_path, is_trainable=True)
    assert fastpeft.trainable_parameters(trainable).trainable == theirs.get_nb_trainable_parameters()[0]


def test_round_trip_keeps_config_and_outputs(tmp_path):
    make, kwargs = CASES["llama"]
    model = fastpeft.inject(make(), LoraConfig(init_lora_weights=False, **kwargs))
    model.config.name_or_path = "tiny/llama"
    fastpeft.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["base_model_name_or_path"] == "tiny/llama"
    assert saved["target_modules"] == sorted(name for name, _ in lora_layers(model))  # all-linear resolved, as PEFT
    loaded = fastpeft.load_adapter(make(), tmp_path)
    assert_close(forward(loaded), forward(model), torch.float32, "round trip")


def _rewrite_keys(directory: Path, rename) -> None:
    tensors = safetensors.torch.load_file(directory / WEIGHTS)
    safetensors.torch.save_file({rename(k): v for k, v in tensors.items()}, directory / WEIGHTS, {"format": "pt"})


@pytest.mark.parametrize("variant", ["adapter-name", "no-prefix"])
def test_key_variants(variant, tmp_path):
    theirs = peft_model(tiny_llama, r=4, target_modules=["q_proj", "up_proj"])
    theirs.save_pretrained(tmp_path)
    if variant == "adapter-name":
        _rewrite_keys(tmp_path, lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."))
    else:
        _rewrite_keys(tmp_path, lambda k: k.removeprefix("base_model.model."))
    ours = fastpeft.load_adapter(tiny_llama(), tmp_path)
    assert_close(forward(ours), forward(theirs), torch.float32, f"logits, keys {variant}")


FROM_PEFT_CASES = {
    "llama": (tiny_llama, dict(r=4, lora_dropout=0.1, target_modules="all-linear", modules_to_save=["lm_head"],
                               rank_pattern={"o_proj": 2}, use_rslora=True)),
    "gpt2": (tiny_gpt2, dict(r=4, lora_dropout=0.1, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def _our_name(peft_name: str) -> str:
    return (peft_name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            .replace(".default.", "."))


@pytest.mark.parametrize("case", FROM_PEFT_CASES)
def test_from_peft_same_outputs_and_gradients_sharing_weights(case):
    make, kwargs = FROM_PEFT_CASES[case]
    reference = peft_model(make, **kwargs)
    if "modules_to_save" in kwargs:
        perturb(reference.base_model.model.lm_head.modules_to_save["default"])
    twin = copy.deepcopy(reference)
    shared = {_our_name(n): p for n, p in twin.named_parameters() if "original_module" not in n}
    model = fastpeft.from_peft(twin)
    assert model is twin.get_base_model()
    params = dict(model.named_parameters())
    assert params.keys() == {_our_name(n).replace(".base_layer.", ".") for n in shared}
    for name, p in shared.items():
        assert params[name.replace(".base_layer.", ".")] is p, name  # the same tensors: nothing copied
    assert all(layer.lora_dropout == 0.1 for _, layer in lora_layers(model))

    expected, out = forward(reference), forward(model)
    assert_adapter_matters(expected, make)
    assert_close(out, expected, torch.float32, "from_peft logits")
    expected.square().mean().backward()
    out.square().mean().backward()
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert {_our_name(n) for n in trainable} == {n for n, p in params.items() if p.requires_grad}
    for name, p in trainable.items():
        assert_close(params[_our_name(name)].grad, p.grad, torch.float32, f"grad of {name}")


def test_from_peft_keeps_a_merged_adapter_merged():
    reference = peft_model(TinyNet, r=3, target_modules=["proj", "gate"])
    expected = forward(reference)
    reference.merge_adapter()
    model = fastpeft.from_peft(reference)
    assert all(layer.merged for _, layer in lora_layers(model))
    assert_close(forward(model), expected, torch.float32, "merged by PEFT")
    assert_close(forward(fastpeft.merge_and_unload(model)), expected, torch.float32, "after merge_and_unload")


@pytest.mark.parametrize("setup,match", [
    (lambda m: m.add_adapter("second", peft.LoraConfig(target_modules=["q_proj"])), "adapters"),
    (None, "Embedding"),
], ids=["two-adapters", "embedding"])
def test_from_peft_refuses_what_it_cannot_run_and_changes_nothing(setup, match):
    targets = ["q_proj"] if setup else ["q_proj", "embed_tokens"]
    model = peft_model(tiny_llama, target_modules=targets)
    if setup:
        setup(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastpeft.from_peft(model)
    assert_unchanged(model, before)


def test_from_peft_argument_errors():
    with pytest.raises(TypeError, match="peft_model"):
        fastpeft.from_peft(tiny_llama())


@pytest.fixture
def peft_dir(tmp_path) -> Path:
    theirs = peft_model(tiny_llama, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    theirs.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory: Path, edit) -> None:
    tensors = safetensors.torch.load_file(directory / WEIGHTS)
    edit(tensors)
    safetensors.torch.save_file(tensors, directory / WEIGHTS, {"format": "pt"})


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
BREAKAGES = {
    "missing-key": (lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), ValueError, "missing keys"),
    "extra-key": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q0}.lora_C.weight": torch.zeros(2)})),
                  ValueError, "unexpected keys"),
    "wrong-shape": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(5, 64)})),
                    ValueError, r"shape \(5, 64\), expected \(4, 64\)"),
    "int-weights": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)})),
                    ValueError, "dtype"),
    "rank-mismatch": (lambda d: _edit_config(d, rank_pattern={"v_proj": 2}), ValueError, "shape"),
    "two-adapter-names": (lambda d: _edit_tensors(d, lambda t: t.update(
        {f"{Q0}.lora_A.x.weight": t.pop(f"{Q0}.lora_A.weight"), f"{Q0}.lora_B.y.weight": t.pop(f"{Q0}.lora_B.weight")})),
        ValueError, "several adapters"),
    "corrupt-weights": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:300]), ValueError, "safetensors"),
    "bad-json": (lambda d: (d / "adapter_config.json").write_text("{"), ValueError, "JSON"),
    "deeply-nested-json": (lambda d: (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),
                           ValueError, "too deeply"),
    "other-peft-type": (lambda d: _edit_config(d, peft_type="IA3"), ValueError, "peft_type"),
    # a DoRA config over LoRA-only weights: the magnitudes are missing
    "dora-without-magnitudes": (lambda d: _edit_config(d, use_dora=True), ValueError, "lora_magnitude_vector"),
    "no-match": (lambda d: _edit_config(d, target_modules=["w_proj"]), ValueError, "no module matches"),
    "no-config": (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "adapter_config.json"),
    "no-weights": (lambda d: (d / WEIGHTS).unlink(), FileNotFoundError, WEIGHTS),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_adapter_files_raise_and_leave_model_unchanged(breakage, peft_dir):
    damage, exc, match = BREAKAGES[breakage]
    damage(peft_dir)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fastpeft.load_adapter(model, peft_dir)
    assert_unchanged(model, before)


def test_loading_onto_an_adapted_model_is_refused(peft_dir):
    model = fastpeft.load_adapter(tiny_llama(), peft_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has fastpeft LoRA layers"):
        fastpeft.load_adapter(model, peft_dir)
    assert_unchanged(model, before)


_UNPICKLED = []


class _Payload:
    """Runs code when unpickled by a full unpickler."""

    def __reduce__(self):
        return (_UNPICKLED.append, ("code ran",))


def test_pickle_weights_need_allow_pickle_and_load_weights_only(peft_dir):
    expected = forward(fastpeft.load_adapter(tiny_llama(), peft_dir))
    torch.save(safetensors.torch.load_file(peft_dir / WEIGHTS), peft_dir / "adapter_model.bin")
    (peft_dir / WEIGHTS).unlink()
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        fastpeft.load_adapter(model, peft_dir)
    assert_unchanged(model, before)
    assert_close(forward(fastpeft.load_adapter(model, peft_dir, allow_pickle=True)), expected, torch.float32, "bin")

    torch.save({"x": _Payload()}, peft_dir / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        fastpeft.load_adapter(tiny_llama(), peft_dir, allow_pickle=True)
    assert not _UNPICKLED


def test_format_detection_takes_the_first_matching_format(tmp_path):
    """The last format (PEFT LoRA) takes every directory the others do not claim, so each
    directory is read by exactly the format that detects it first."""
    from fastpeft.api.adapters import FORMATS
    from fastpeft.formats.file_names import ADAPTER_FILE_NAMES
    from fastpeft.formats.snapshot import open_snapshot

    assert FORMATS[-1].name == "PEFT LoRA"
    model = fastpeft.inject(tiny_llama(), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    fastpeft.save_adapter(model, tmp_path)
    with open_snapshot(tmp_path, ADAPTER_FILE_NAMES) as snapshot:
        assert [f.name for f in FORMATS if f.detect(snapshot)] == ["PEFT prompt learning", "PEFT LoRA"]
