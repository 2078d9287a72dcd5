"""DoRA (``LoraConfig(use_dora=True)``, ``DoRALinear``) against HF PEFT's own DoRA, on a tiny
Llama (``nn.Linear``) and GPT-2 (``Conv1D``, ``fan_in_fan_out``):

* the same weights give the same logits and the same gradients of A, B and the magnitude
  (fp32, relative 1e-5), in training and eval mode;
* files both ways: PEFT loads what ``save_adapter`` writes and fastpeft loads what PEFT's
  ``save_pretrained`` writes, same keys (``...lora_magnitude_vector``), same outputs;
* ``inject`` initialises the magnitude as PEFT does (the model starts as its LoRA model);
* ``merge_and_unload`` merges as PEFT's does; ``unload`` gives the base model back; ``merge`` /
  ``unmerge`` round-trip;
* ``from_peft`` converts a PEFT DoRA model, sharing its parameters;
* the inference cache of the row norm follows weight updates;
* the composition used when ``lora_A`` / ``lora_B`` are FSDP units of their own (through their
  forwards) computes what the op does (``tests/integrations/test_distributed.py`` runs it
  under FSDP2);
* ``MultiAdapterModel(dora=True)`` serves DoRA and LoRA adapters in one batch;
* a PEFT-merged DoRA layer is refused by name (``tests/methods/lora/test_qlora_model.py`` has
  DoRA on quantized bases).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft.methods.lora.dora_layer import DoRALinear
from fastpeft.methods.lora.model import lora_layers
from tests.helpers.models import forward, peft, tiny_gpt2, tiny_llama, token_ids
from tests.helpers.numerics import TOLERANCE, assert_close, relative_error

CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                             use_rslora=True)),
}


def peft_dora(make, **kwargs) -> torch.nn.Module:
    """A PEFT DoRA model with trained-looking weights: random A and B, the magnitude moved off
    its init (so that every part of the math matters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def ours_like(reference: torch.nn.Module, make, **kwargs) -> torch.nn.Module:
    """fastpeft's DoRA model of the same base holding ``reference``'s adapter weights."""
    model = fastpeft.inject(make(), fastpeft.LoraConfig(use_dora=True, **kwargs))
    saved = peft.get_peft_model_state_dict(reference)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in saved.items():
            params[key.removeprefix("base_model.model.")].copy_(value)
    assert len(saved) == len([p for p in params.values() if p.requires_grad])
    return model


def _our_name(peft_name: str) -> str:
    """fastpeft's parameter name of a PEFT one (``x.lora_A.default.weight`` -> ``x.lora_A.weight``,
    ``x.lora_magnitude_vector.default.weight`` -> ``x.lora_magnitude_vector``)."""
    name = peft_name.removeprefix("base_model.model.")
    if ".lora_magnitude_vector." in name:
        return name.replace(".default.weight", "")
    return name.replace(".default.", ".")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_and_gradients_equal_pefts(case, mode):
    make, kwargs = CASES[case]
    reference = peft_dora(make, **kwargs)
    ours = ours_like(reference, make, **kwargs)
    reference.train(mode == "train")
    ours.train(mode == "train")
    torch.manual_seed(0)  # GPT-2's own dropout in training mode: the same draws on both sides
    expected = forward(reference)
    torch.manual_seed(0)
    got = forward(ours)
    assert relative_error(expected, forward(make())) > 1e-3, "the adapter does not matter: vacuous"
    assert_close(got, expected, torch.float32, "logits")
    expected.square().mean().backward()
    got.square().mean().backward()
    params = dict(ours.named_parameters())
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert {_our_name(n) for n in trainable} == {n for n, p in params.items() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)
    for name, p in trainable.items():
        assert_close(params[_our_name(name)].grad, p.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("case", CASES)
def test_files_both_ways(case, tmp_path):
    """PEFT loads what fastpeft saves and fastpeft loads what PEFT saves: the same keys and the
    same outputs."""
    make, kwargs = CASES[case]
    reference = peft_dora(make, **kwargs).eval()
    ours = ours_like(reference, make, **kwargs).eval()
    reference.save_pretrained(tmp_path / "peft")
    fastpeft.save_adapter(ours, tmp_path / "ours")
    theirs_keys = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == theirs_keys
    assert any(key.endswith(".lora_magnitude_vector") for key in theirs_keys)
    expected = forward(reference)
    loaded = fastpeft.load_adapter(make(), tmp_path / "peft")
    assert all(isinstance(layer, DoRALinear) for _, layer in lora_layers(loaded))
    assert_close(forward(loaded), expected, torch.float32, "fastpeft loading PEFT's files")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert_close(forward(theirs), expected, torch.float32, "PEFT loading fastpeft's files")


@pytest.mark.parametrize("init", [True, False])
def test_inject_initialises_the_magnitude_as_peft(init):
    """``inject`` sets each magnitude to the row norms of ``W + s B A`` for the initial A and B,
    as PEFT does: a fresh DoRA model computes what the LoRA model with the same A and B does."""
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                                       use_dora=True, init_lora_weights=init))
    torch.manual_seed(3)
    ours = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                             use_dora=True, init_lora_weights=init))
    saved = {_our_name(k): v for k, v in peft.get_peft_model_state_dict(reference).items()}
    params = dict(ours.named_parameters())
    for key, value in saved.items():
        if key.endswith("lora_magnitude_vector"):
            layer = ours.get_submodule(key.rpartition(".")[0])
            assert_close(params[key].double(), torch.linalg.norm(
                layer.weight.double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double(),
                dim=1), torch.float32, key)
    lora = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                             init_lora_weights=init))
    lora.load_state_dict({k: v for k, v in ours.state_dict().items() if "magnitude" not in k})
    assert_close(forward(ours.eval()), forward(lora.eval()), torch.float32, "fresh DoRA vs LoRA")


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_equals_pefts(case):
    make, kwargs = CASES[case]
    reference = peft_dora(make, **kwargs).eval()
    ours = ours_like(reference, make, **kwargs).eval()
    expected = forward(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = reference.merge_and_unload()
    merged = fastpeft.merge_and_unload(ours)
    assert not lora_layers(merged)
    assert_close(forward(merged), expected, torch.float32, "merged logits")
    mine, their_state = merged.state_dict(), theirs.state_dict()
    assert mine.keys() == their_state.keys()
    for key, value in their_state.items():
        assert_close(mine[key], value, torch.float32, key)


def test_merge_unmerge_round_trip_and_unload():
    make, kwargs = CASES["gpt2"]
    reference = peft_dora(make, **kwargs).eval()
    ours = ours_like(reference, make, **kwargs).eval()
    expected = forward(ours)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for _, layer in lora_layers(ours):
        layer.merge()
    assert_close(forward(ours), expected, torch.float32, "merged")
    for _, layer in lora_layers(ours):
        layer.unmerge()
    for name, value in ours.named_parameters():
        assert_close(value.detach(), before[name], torch.float32, name)
    assert_close(forward(fastpeft.unload(ours)), forward(make()), torch.float32, "unloaded: the base model")


def test_from_peft_converts_dora_sharing_parameters():
    make, kwargs = CASES["llama"]
    reference = peft_dora(make, lora_dropout=0.0, **kwargs).train()
    twin = copy.deepcopy(reference)
    magnitudes = {_our_name(n): p for n, p in twin.named_parameters() if "lora_magnitude_vector" in n}
    model = fastpeft.from_peft(twin)
    params = dict(model.named_parameters())
    assert magnitudes and all(params[name] is p for name, p in magnitudes.items())
    expected, got = forward(reference), forward(model)
    assert_close(got, expected, torch.float32, "from_peft logits")
    expected.sum().backward()
    got.sum().backward()
    for name, p in magnitudes.items():
        peft_param = dict(reference.named_parameters())[f"base_model.model.{name}.default.weight"]
        assert_close(p.grad, peft_param.grad, torch.float32, f"grad of {name}")


def test_from_peft_refuses_a_merged_dora_layer():
    make, kwargs = CASES["llama"]
    reference = peft_dora(make, **kwargs)
    reference.merge_adapter()
    with pytest.raises(ValueError, match="merged DoRA layer .* unmerge it first"):
        fastpeft.from_peft(reference)


def test_dropout_trains_and_eval_ignores_it():
    """With dropout the training forward differs from eval's, the eval forward is deterministic,
    and every adapter tensor gets a gradient."""
    model = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                              lora_dropout=0.5, init_lora_weights=False))
    ids = token_ids()
    torch.manual_seed(0)
    trained = model.train()(ids).logits
    trained.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second) and not torch.allclose(first, trained)


def test_inference_row_norm_is_cached_until_the_weights_change(monkeypatch):
    """At inference the row norm is computed once per layer and reused; an in-place update of
    A (an optimizer step) or a replaced B makes the next forward recompute it."""
    model = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                              init_lora_weights=False)).eval()
    layers = [layer for _, layer in lora_layers(model)]
    calls = []
    import fastpeft.methods.lora.dora_layer as dora_module

    original = dora_module.dora_row_norm
    monkeypatch.setattr(dora_module, "dora_row_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = token_ids()
    with torch.no_grad():
        model(ids)
        assert len(calls) == len(layers)
        before = model(ids).logits
        assert len(calls) == len(layers)  # reused
        layers[0].lora_A.weight.mul_(2.0)
        after = model(ids).logits
        assert len(calls) == len(layers) + 1
        layers[1].lora_B.weight = torch.nn.Parameter(layers[1].lora_B.weight * 3.0)
        model(ids)
        assert len(calls) == len(layers) + 2
    uncached = copy.deepcopy(model)
    for layer in (m for _, m in lora_layers(uncached)):
        layer._memos.clear()
    with torch.no_grad():
        assert_close(model(ids).logits, uncached(ids).logits, torch.float32, "cached vs fresh")
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compiled_layer_matches_eager(dropout_p):
    """``torch.compile(fullgraph=True)`` of a DoRA layer (train mode, with and without dropout)
    computes what eager does, forward and every gradient (``fallback_random``: Inductor draws
    the dropout seed from eager's generator stream)."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    layer = DoRALinear.from_linear(torch.nn.Linear(40, 24), r=4, lora_alpha=8, lora_dropout=dropout_p,
                                   init_lora_weights=False).train()
    x = torch.randn(2, 5, 40, requires_grad=True)
    leaves = (x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)
    runs = []
    with inductor_config.patch(fallback_random=True):
        for run in (torch.compile(layer, fullgraph=True), layer):
            torch.manual_seed(0)
            y = run(x)
            y.square().sum().backward()
            runs.append((y.detach(), [t.grad.clone() for t in leaves]))
            for t in leaves:
                t.grad = None
    (y_compiled, grads_compiled), (y_eager, grads_eager) = runs
    torch.testing.assert_close(y_compiled, y_eager)
    for got, expected in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_like_peft(dtype):
    """Under CPU autocast the DoRA model's logits, loss and adapter gradients are as close to
    the fp32 run's as PEFT's DoRA under the same autocast (and to PEFT's, within the dtype's
    tolerance)."""
    make, kwargs = CASES["llama"]
    reference = peft_dora(make, **kwargs)
    ours = ours_like(reference, make, **kwargs)
    ids = token_ids()

    def step(model, autocast_dtype):
        model.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
        return out.logits.float(), out.loss.float(), grads

    exact, theirs, mine = step(reference, None), step(reference, dtype), step(ours, dtype)
    for ours_t, peft_t, exact_t, what in zip(mine, theirs, exact, ("logits", "loss", "adapter grads")):
        assert relative_error(ours_t, peft_t) <= 2 * TOLERANCE[dtype], what
        assert relative_error(ours_t, exact_t) <= max(2 * relative_error(peft_t, exact_t), TOLERANCE[dtype] / 10), what


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_submodule_composition_equals_the_op(fan_in_fan_out):
    """``_forward_apart`` (what runs when ``lora_A`` / ``lora_B`` are FSDP units of their own)
    gives the op's output and gradients (x, A, B, m), on ``nn.Linear`` and ``Conv1D``. Without
    dropout: the two draw their masks differently (torch's dropout, the op's seeded mask)."""
    base = tiny_gpt2().transformer.h[0].attn.c_attn if fan_in_fan_out else torch.nn.Linear(24, 16)
    layer = DoRALinear.wrap(base, r=4, lora_alpha=8, init_lora_weights=False).eval()
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude_vector))
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    leaves = (x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)
    results = []
    for run in (layer._fused_forward, layer._forward_apart):
        y = run(x)
        y.square().sum().backward()
        results.append((y.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    (y_op, grads_op), (y_apart, grads_apart) = results
    assert_close(y_apart, y_op, torch.float32, "output")
    for got, expected, name in zip(grads_apart, grads_op, ("x", "A", "B", "m")):
        assert_close(got, expected, torch.float32, f"grad of {name}")


class PeftTestMLP(torch.nn.Module):
    """The MLP of PEFT's own model tests (``test_custom_models``): 10 -> 20 -> 2 with ReLU,
    dropout 0.5 and a log-softmax; its DoRA rows target ``lin0``, both layers, or ``lin1``
    (a regex string) with ``lora_alpha=32``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


# row -> (its LoraConfig keywords besides use_dora, the layers it adapts)
PEFT_DORA_ROWS = {
    "Vanilla MLP 7 LoRA with DoRA": ({"target_modules": ["lin0"]}, {"lin0"}),
    "Vanilla MLP 8 LoRA with DoRA": ({"target_modules": ["lin0", "lin1"]}, {"lin0", "lin1"}),
    "Vanilla MLP 9 LoRA with DoRA": ({"target_modules": "lin1", "lora_alpha": 32}, {"lin1"}),
}


def _mlp(seed: int = 0) -> PeftTestMLP:
    torch.manual_seed(seed)
    return PeftTestMLP().eval()


@pytest.mark.parametrize("row", PEFT_DORA_ROWS)
def test_pefts_own_dora_rows_load_save_both_ways_and_merge(row, tmp_path):
    """PEFT's DoRA test rows on its test MLP: PEFT's files load into fastpeft, fastpeft's into
    PEFT, and fastpeft's merge equals PEFT's, all computing the PEFT model's output."""
    kwargs, layers = PEFT_DORA_ROWS[row]
    reference = peft_dora(_mlp, **kwargs).eval()
    x = torch.randn(6, 10)
    expected = reference(x)
    assert relative_error(expected, _mlp()(x)) > 1e-3, "the adapter does not matter: vacuous"
    reference.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(_mlp(), tmp_path / "peft")
    assert {name for name, _ in lora_layers(ours)} == layers
    assert_close(ours(x), expected, torch.float32, "fastpeft loading PEFT's files")
    fastpeft.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_mlp(), tmp_path / "ours").eval()
        their_merged = theirs.merge_and_unload()
    assert_close(their_merged(x), expected, torch.float32, "PEFT loading fastpeft's files, merged")
    merged = fastpeft.merge_and_unload(ours)
    assert_close(merged(x), expected, torch.float32, "fastpeft's merge")
    for name, value in their_merged.state_dict().items():
        assert_close(merged.state_dict()[name], value, torch.float32, name)


def test_pefts_conv2d_dora_rows_are_refused_by_name():
    """PEFT's "Conv2d 1/2 LoRA with DoRA" rows target an ``nn.Conv2d``, which fastpeft's LoRA
    does not adapt: refused naming the layer, the model unchanged."""
    model = torch.nn.Sequential()
    model.add_module("conv2d", torch.nn.Conv2d(3, 4, 3))
    model.add_module("lin0", torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="conv2d"):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["conv2d", "lin0"], use_dora=True))
    assert not lora_layers(model)


def _saved_adapter(directory, seed: int, use_dora: bool, r: int) -> None:
    """A trained-looking adapter on q_proj / v_proj of the tiny Llama, saved to ``directory``."""
    torch.manual_seed(seed)
    model = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                              use_dora=use_dora, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    fastpeft.save_adapter(model, directory)


def test_serving_mixes_dora_and_lora_adapters_in_one_batch(tmp_path):
    """``MultiAdapterModel(dora=True)``: two DoRA adapters, a LoRA one and base rows in one
    batch; each row equals the model with that adapter alone (fastpeft's ``DoRALinear`` /
    ``LoRALinear``, themselves PEFT's); a slot that held a DoRA adapter serves a LoRA adapter
    loaded into it afterwards; without ``dora=True`` a DoRA adapter is refused, naming it."""
    specs = {"dora-a": (1, True, 4), "lora": (2, False, 8), "dora-b": (3, True, 2)}
    for name, (seed, use_dora, r) in specs.items():
        _saved_adapter(tmp_path / name, seed, use_dora, r)
    serving = fastpeft.MultiAdapterModel(tiny_llama(), max_adapters=3, max_rank=8,
                                         target_modules=["q_proj", "v_proj"], dora=True).eval()
    for name in specs:
        serving.load_adapter(name, tmp_path / name)
    names = ["dora-a", "lora", None, "dora-b", "dora-a"]
    ids = token_ids(4, (len(names), 7))
    with torch.no_grad():
        got = serving(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = tiny_llama() if name is None else fastpeft.load_adapter(tiny_llama(), tmp_path / name)
            assert_close(got[row], alone.eval()(input_ids=ids[row:row + 1]).logits[0], torch.float32, f"row {row}")
        slot = serving.adapters["dora-b"]
        serving.unload_adapter("dora-b")
        _saved_adapter(tmp_path / "lora-2", 4, False, 4)
        assert serving.load_adapter("lora-2", tmp_path / "lora-2") == slot
        got = serving(input_ids=ids[:1], adapter_names=["lora-2"]).logits
        expected = fastpeft.load_adapter(tiny_llama(), tmp_path / "lora-2").eval()(input_ids=ids[:1]).logits
    assert_close(got, expected, torch.float32, "a LoRA adapter in a former DoRA slot")
    plain = fastpeft.MultiAdapterModel(tiny_llama(), max_adapters=2, max_rank=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="DoRA adapter .* dora=True"):
        plain.load_adapter("dora-a", tmp_path / "dora-a")


def test_submodule_composition_with_dropout_equals_pefts(monkeypatch):
    """With dropout in training mode, the composition through A and B's forwards (what FSDP2
    units of their own run; forced here) draws its mask with torch's generator once per layer,
    as PEFT does: from one seed, logits and A / B / m gradients equal PEFT's."""
    import fastpeft.methods.lora.layer as layer_module

    monkeypatch.setattr(layer_module, "sharded_apart", lambda *modules: True)
    make, kwargs = CASES["llama"]
    reference = peft_dora(make, lora_dropout=0.3, **kwargs).train()
    ours = ours_like(reference, make, lora_dropout=0.3, **kwargs).train()
    outputs = []
    for model in (reference, ours):
        torch.manual_seed(5)
        outputs.append(forward(model))
        outputs[-1].square().mean().backward()
    assert_close(outputs[1], outputs[0], torch.float32, "logits")
    params = dict(ours.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert_close(params[_our_name(name)].grad, p.grad, torch.float32, f"grad of {name}")


def test_inference_cache_is_dropped_by_train_and_eval_and_skips_inference_tensors():
    """A write through ``.data`` bumps no version counter: the documented remedy, calling
    ``eval()`` again (any ``train()``), reads the weights afresh; parameters made under
    ``torch.inference_mode`` (no version counter) are never cached, and the layer runs."""
    model = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                              init_lora_weights=False)).eval()
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        for _, layer in lora_layers(model):
            layer.lora_B.weight.data.mul_(3.0)
        model.eval()
        after = model(ids).logits
        fresh = copy.deepcopy(model)
        for _, layer in lora_layers(fresh):
            layer._memos.clear()
        assert_close(after, fresh(ids).logits, torch.float32, "after eval()")
    assert not torch.allclose(before, after)
    with torch.inference_mode():
        frozen = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
        frozen.eval()
        frozen(ids)
        assert all("row_norm" not in layer._memos for _, layer in lora_layers(frozen))
