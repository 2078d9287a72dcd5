"""``save_adapter(model, directory, state_dict=...)`` and ``save_pretrained(state_dict=...)``:
the adapter is taken from a state dict the caller gathered (what Trainer passes under FSDP and
DeepSpeed ZeRO-3), never from the model's own tensors, and a state dict without the whole
adapter is an error that writes nothing."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft.methods.state import adapter_state
from tests.helpers.adapter_cases import CASES, adapted, base_model
from tests.helpers.trainer import TRAINER_COPY
from tests.helpers.training import build_model

transformers = pytest.importorskip("transformers")

# A LoRA case beside adapter_cases' others: random A and B, a modules_to_save copy of the head.
LORA = "lora_modules_to_save"


def _model(case: str, seed: int) -> torch.nn.Module:
    if case != LORA:
        return adapted(case, seed)
    model = build_model("llama")
    torch.manual_seed(seed)
    return fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["lm_head"], init_lora_weights=False))


def _perturbed_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every floating tensor redrawn: a save from it must hold
    none of the model's own values."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _adapter_keys(case: str, model: torch.nn.Module) -> list[str]:
    """The keys of the model's state dict that belong to its adapter: those the base model
    lacks, and those of the ``modules_to_save`` copies (trained in place, under the base's keys)."""
    base_keys = base_model("llama" if case == LORA else CASES[case][0]).state_dict().keys()
    saved_modules = tuple(f"{path}." for path in getattr(adapter_state(model), "modules_to_save", ()))
    return [k for k in model.state_dict() if k not in base_keys or k.startswith(saved_modules)]


@pytest.mark.parametrize("case", [LORA, *CASES])
def test_the_adapter_comes_from_the_state_dict(case, tmp_path):
    """The files equal those of a save of a model holding the state dict's values (byte for
    byte), with or without the base's entries; the model itself is left as it was."""
    model = _model(case, seed=0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    state_dict = _perturbed_state_dict(model, seed=len(case))
    expected = _model(case, seed=0)
    expected.load_state_dict(state_dict)
    fastpeft.save_adapter(expected, tmp_path / "expected")

    fastpeft.save_adapter(model, tmp_path / "given", state_dict=state_dict)
    assert _files(tmp_path / "given") == _files(tmp_path / "expected")
    adapter_only = {k: state_dict[k] for k in _adapter_keys(case, model)}
    assert len(adapter_only) < len(state_dict)
    fastpeft.save_adapter(model, tmp_path / "adapter-only", state_dict=adapter_only)
    assert _files(tmp_path / "adapter-only") == _files(tmp_path / "expected")

    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", [LORA, "seq_bn", "prefix_mlp"])
def test_state_dicts_without_the_whole_adapter_are_refused(case, tmp_path):
    """Empty (DeepSpeed ZeRO-3 without gathering), partial (one key missing), a wrong shape
    (a shard), an integer dtype, a non-tensor value or a non-mapping: a clear error naming
    what is wrong, and nothing written."""
    model = _model(case, seed=0)
    state_dict = model.state_dict()
    key = _adapter_keys(case, model)[-1]
    bad = {
        "empty": ({}, ValueError, "state_dict is empty"),
        "partial": ({k: v for k, v in state_dict.items() if k != key}, ValueError, f"missing \\['{key}'\\]"),
        "shard": ({**state_dict, key: state_dict[key][:1]}, ValueError, f"state_dict\\['{key}'\\] has shape"),
        "integer": ({**state_dict, key: state_dict[key].long()}, ValueError, f"'{key}' has dtype torch.int64"),
        "not a tensor": ({**state_dict, key: state_dict[key].tolist()}, TypeError, "must be a tensor, got list"),
        "not a mapping": (list(state_dict.items()), TypeError, "state_dict must be a mapping"),
    }
    for name, (given, error, message) in bad.items():
        with pytest.raises(error, match=message):
            fastpeft.save_adapter(model, tmp_path / name, state_dict=given)
        assert not (tmp_path / name).exists(), name


def test_save_pretrained_takes_the_adapter_from_the_state_dict(tmp_path):
    """``save_pretrained(state_dict=...)`` (Trainer under FSDP / DeepSpeed) writes the adapter
    from the state dict on the main process, and its Trainer copy (the state dict's adapter
    entries), nothing on the others, and refuses an empty one (ZeRO-3 without
    stage3_gather_16bit_weights_on_model_save) instead of a weightless save."""
    model = _model(LORA, seed=0)
    state_dict = _perturbed_state_dict(model, seed=3)
    model.save_pretrained(tmp_path / "main", state_dict=state_dict)
    fastpeft.save_adapter(model, tmp_path / "expected", state_dict=state_dict)
    main = _files(tmp_path / "main")
    copy = safetensors.torch.load(main.pop(TRAINER_COPY))
    assert main == _files(tmp_path / "expected")
    keys = _adapter_keys(LORA, model)
    assert copy.keys() == set(keys) and all(torch.equal(copy[k], state_dict[k]) for k in keys)
    model.save_pretrained(tmp_path / "other", state_dict={}, is_main_process=False)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        model.save_pretrained(tmp_path / "empty", state_dict={})
