"""``fastpeft.MultiAdapterModel`` against HF PEFT's mixed-adapter batches, on tiny random
Llama and GPT-2 models (no downloads) with several PEFT adapters saved to disk: different
ranks, alphas, rsLoRA, rank/alpha patterns and target modules. Runs on the torch path (the
kernels have their own tests in tests/ops/test_multi_lora_linear.py), in float32."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fastpeft
from tests.helpers.models import VOCAB, tiny_gpt2, tiny_llama
from tests.helpers.peft_adapters import GPT2_ADAPTERS, LLAMA_ADAPTERS, save_adapters

peft = pytest.importorskip("peft")


def _peft_mixed(base, dirs: dict):
    names = list(dirs)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    return model.eval()


def _ours(base, dirs: dict, **kwargs) -> fastpeft.MultiAdapterModel:
    model = fastpeft.MultiAdapterModel(copy.deepcopy(base), max_adapters=4, max_rank=16, **kwargs)
    for name, directory in dirs.items():
        model.load_adapter(name, directory)
    return model


def _batch(seed: int, batch: int, length: int, left_pad: list[int]):
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate(left_pad):
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    base = tiny_llama() if request.param == "llama" else tiny_gpt2()
    adapters = LLAMA_ADAPTERS if request.param == "llama" else GPT2_ADAPTERS
    dirs = save_adapters(base, adapters, tmp_path_factory.mktemp(request.param))
    return base, dirs, _peft_mixed(base, dirs), _ours(base, dirs)


@torch.no_grad()
def test_mixed_batch_logits_match_peft_and_single_adapters(setup):
    base, dirs, peft_model, ours = setup
    names = list(dirs)
    # Repeated and interleaved adapters, the base (None), left padding.
    adapter_names = [names[0], None, names[-1], names[0], names[1], None]
    ids, mask = _batch(3, len(adapter_names), 7, [0, 2, 0, 3, 1, 0])
    peft_names = [name or "__base__" for name in adapter_names]
    expected = peft_model(input_ids=ids, attention_mask=mask, adapter_names=peft_names).logits
    got = ours(input_ids=ids, attention_mask=mask, adapter_names=adapter_names).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for b, name in enumerate(adapter_names):  # each sequence alone with its adapter in PEFT
        if name is None:
            with peft_model.disable_adapter():
                alone = peft_model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        else:
            peft_model.set_adapter(name)
            alone = peft_model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        keep = mask[b].bool()
        torch.testing.assert_close(got[b][keep], alone[0][keep], rtol=1e-5, atol=1e-5)
    base_logits = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, base_logits)
    assert not torch.allclose(got[0], base_logits[0], atol=1e-3), "adapters must change the output"


@torch.no_grad()
def test_greedy_generate_matches_each_sequence_alone_in_peft(setup):
    base, dirs, peft_model, ours = setup
    names = list(dirs)
    adapter_names = [names[-1], names[0], None, names[-1]]
    ids, mask = _batch(5, len(adapter_names), 6, [2, 0, 1, 0])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = ours.generate(input_ids=ids, attention_mask=mask, adapter_names=adapter_names, **kwargs)
    for b, name in enumerate(adapter_names):
        start = int((mask[b] == 0).sum())  # alone: no padding
        single = dict(input_ids=ids[b:b + 1, start:], attention_mask=mask[b:b + 1, start:], **kwargs)
        if name is None:
            with peft_model.disable_adapter():
                alone = peft_model.generate(**single)
        else:
            peft_model.set_adapter(name)
            alone = peft_model.generate(**single)
        assert out[b, ids.shape[1]:].tolist() == alone[0, ids.shape[1] - start:].tolist(), f"sequence {b} ({name})"


@torch.no_grad()
def test_load_unload_touch_only_their_slot(setup, tmp_path):
    base, dirs, _, _ = setup
    ours = _ours(base, dirs)
    names = list(dirs)
    ids, mask = _batch(7, 2, 5, [0, 0])
    ours.load_adapter("extra", dirs[names[0]])
    mix = [names[0], names[-1]]
    before = ours(input_ids=ids, attention_mask=mask, adapter_names=mix).logits
    storage = {p: (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) for p, layer in ours.layers.items()}
    ours.unload_adapter("extra")
    ours.load_adapter("extra2", dirs[names[-1]])
    after = ours(input_ids=ids, attention_mask=mask, adapter_names=mix).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert storage == {p: (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) for p, layer in ours.layers.items()}
    with pytest.raises(KeyError, match="not loaded"):
        ours.unload_adapter("nope")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_adapter(names[0], dirs[names[0]])
    for n in range(len(ours.adapters), 4):
        ours.load_adapter(f"filler{n}", dirs[names[0]])
    with pytest.raises(ValueError, match="slots are in use"):
        ours.load_adapter("one_too_many", dirs[names[0]])
    with pytest.raises(ValueError, match="not loaded"):
        ours(input_ids=ids, adapter_names=["missing", None])
    with pytest.raises(ValueError, match="one adapter name"):
        ours(input_ids=ids, adapter_names=[names[0]])
    with pytest.raises(TypeError, match="adapter_names must be a list"):  # not "has 3 entries for a batch of 2"
        ours(input_ids=ids, adapter_names="ad1")
    with pytest.raises(TypeError, match="adapter_names must hold adapter names"):
        ours(input_ids=ids, adapter_names=[names[0], 1])


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model))],
                         ids=["deepcopy", "pickle"])
@torch.no_grad()
def test_copies_have_the_adapters_and_are_independent(setup, duplicate):
    base, dirs, _, _ = setup
    ours = _ours(base, dirs)
    names = list(dirs)
    ids, mask = _batch(9, 2, 5, [0, 1])
    mix = [names[-1], names[0]]
    expected = ours(input_ids=ids, attention_mask=mask, adapter_names=mix).logits
    clone = duplicate(ours)
    assert clone.adapters == ours.adapters
    torch.testing.assert_close(clone(input_ids=ids, attention_mask=mask, adapter_names=mix).logits, expected,
                               rtol=0, atol=0)
    clone.unload_adapter(names[0])
    clone.load_adapter("again", dirs[names[0]])
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, adapter_names=mix).logits, expected,
                               rtol=0, atol=0)


def test_bad_adapters_change_nothing(tmp_path):
    base = tiny_llama()
    dirs = save_adapters(base, {"big": dict(r=32, lora_alpha=8, target_modules=["q_proj"]),
                                 "mlp": dict(r=4, lora_alpha=8, target_modules=["down_proj"])}, tmp_path)
    ours = fastpeft.MultiAdapterModel(copy.deepcopy(base), max_adapters=2, max_rank=16,
                                      target_modules=["q_proj", "v_proj"])
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="max_rank"):
        ours.load_adapter("big", dirs["big"])
    with pytest.raises(ValueError, match="has no adapter slots"):
        ours.load_adapter("mlp", dirs["mlp"])
    with pytest.raises(FileNotFoundError):
        ours.load_adapter("none", tmp_path / "missing")
    assert ours.adapters == {}
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_gradient_checkpointing_is_refused_while_training(setup):
    """Its recompute in the backward would run after the call, without the adapter ids:
    refused, not silently the base model's gradients. Eval mode or no_grad are fine."""
    base, dirs, _, _ = setup
    model = _ours(base, dirs)
    model.model.gradient_checkpointing_enable()
    model.train()
    names = list(dirs)[:2]
    ids, mask = _batch(3, 2, 5, [0, 1])
    with pytest.raises(ValueError, match="gradient checkpointing on"):
        model(input_ids=ids, attention_mask=mask, adapter_names=names)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_names=names)
    model.eval()
    model(input_ids=ids, attention_mask=mask, adapter_names=names)
