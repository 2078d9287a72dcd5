"""LoRA on bitsandbytes-quantized models (QLoRA) through the public API, against HF PEFT on the
same bases (a tiny Llama loaded by transformers in 4-bit NF4 with double quantization, 4-bit
FP4 with bf16 storage and compute, and 8-bit): logits and LoRA gradients equal PEFT's; adapter
files both ways; ``from_peft``; ``merge_and_unload`` as PEFT merges; ``unload`` gives back the
quantized layers untouched; other quantizers and unusable layers refused before any change."""

from __future__ import annotations

import copy
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import fastpeft
from fastpeft.api.adapters import adapter_state_dict
from fastpeft.methods.lora.layer import QuantLoRALinear
from fastpeft.methods.quantized_base import quantized_weight
from tests.helpers.quantized import (
    MODEL_SETTINGS,
    TORCHAO,
    TORCHAO_INSTALLED,
    TORCHAO_NF4,
    bnb,
    load_quantized,
    save_tiny_llama,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _load(model_dir, settings: dict) -> nn.Module:
    return load_quantized(model_dir, settings)


def _peft_model(model_dir, settings):
    torch.manual_seed(1)
    return peft.get_peft_model(_load(model_dir, settings), peft.LoraConfig(**LORA)).train()


def _copy_adapter(peft_model, ours) -> None:
    """PEFT's (random, init_lora_weights=False) A and B into fastpeft's layers."""
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): v
              for k, v in peft_model.state_dict().items() if "lora_" in k}
    state = ours.state_dict()
    with torch.no_grad():
        for key, value in theirs.items():
            state[key].copy_(value)


def _inputs():
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name,settings", MODEL_SETTINGS, ids=[n for n, _ in MODEL_SETTINGS])
def test_logits_and_gradients_equal_peft(model_dir, name, settings):
    theirs = _peft_model(model_dir, settings)
    ours = fastpeft.inject(_load(model_dir, settings), fastpeft.LoraConfig(**LORA))
    assert all(isinstance(ours.get_submodule(f"model.layers.{i}.self_attn.q_proj"), QuantLoRALinear) for i in (0, 1))
    _copy_adapter(theirs, ours)
    out, ref = ours(**_inputs()), theirs(**_inputs())
    assert _rel(out.logits, ref.logits) <= 1e-4
    out.loss.backward()
    ref.loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(peft_grads) and len(ours_grads) == 4 * len(TARGETS)
    for key, grad in peft_grads.items():
        assert _rel(ours_grads[key], grad) <= 1e-4, key
    counts = fastpeft.trainable_parameters(ours)
    assert counts.trainable == sum(g.numel() for g in peft_grads.values())
    assert counts.total == theirs.get_nb_trainable_parameters()[1]  # 4-bit weights: the elements they pack


@pytest.mark.parametrize("name,settings", MODEL_SETTINGS, ids=[n for n, _ in MODEL_SETTINGS])
def test_adapter_files_both_ways_and_from_peft(model_dir, tmp_path, name, settings):
    theirs = _peft_model(model_dir, settings).eval()
    with torch.no_grad():  # train mode's forward is the exact one on CPU (module docstring of quantized_base)
        theirs.train()
        reference = theirs(**_inputs()).logits
    theirs.save_pretrained(tmp_path / "peft")
    loaded = fastpeft.load_adapter(_load(model_dir, settings), tmp_path / "peft")
    with torch.no_grad():
        assert _rel(loaded(**_inputs()).logits, reference) <= 1e-4
    fastpeft.save_adapter(loaded, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_load(model_dir, settings), tmp_path / "ours").train()
    with torch.no_grad():
        assert _rel(back(**_inputs()).logits, reference) <= 1e-4
    converted = fastpeft.from_peft(theirs)
    assert isinstance(converted.get_submodule("model.layers.1.mlp.down_proj"), QuantLoRALinear)
    with torch.no_grad():
        assert _rel(converted(**_inputs()).logits, reference) <= 1e-4


@pytest.mark.parametrize("name,settings", MODEL_SETTINGS, ids=[n for n, _ in MODEL_SETTINGS])
def test_merge_and_unload_as_peft_and_unload_untouched(model_dir, name, settings):
    theirs = _peft_model(model_dir, settings)
    ours = fastpeft.inject(_load(model_dir, settings), fastpeft.LoraConfig(**LORA))
    _copy_adapter(theirs, ours)
    adapted = ours.get_submodule("model.layers.0.self_attn.q_proj")
    expected = quantized_weight(adapted.base_module()).dequantize(torch.float32) + adapted.delta_weight()
    with pytest.warns(UserWarning, match="rounding errors"):
        merged = fastpeft.merge_and_unload(ours)
    layer = merged.get_submodule("model.layers.0.self_attn.q_proj")
    if name == TORCHAO_NF4:  # PEFT cannot merge into an NF4Tensor (its aten.add_ is not implemented)
        with pytest.raises(NotImplementedError):
            theirs.merge_and_unload()
        assert type(layer.weight).__name__ == "NF4Tensor"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_merged = theirs.merge_and_unload()
        assert type(layer) is type(peft_merged.get_submodule("model.layers.0.self_attn.q_proj"))
        with torch.no_grad():
            ours_logits, peft_logits = merged(**_inputs()).logits, peft_merged(**_inputs()).logits
        assert _rel(ours_logits, peft_logits) <= 1e-3  # both requantize the merged weight
    # W + delta, requantized: within the quantization's own error (4-bit: ~9% of the weight's norm)
    assert _rel(quantized_weight(layer).dequantize(torch.float32), expected) <= (0.02 if name in ("int8", TORCHAO) else 0.15)

    base = _load(model_dir, settings)
    before = {n: (_stored_bits(m), type(m), type(m.weight)) for n, m in base.named_modules()
              if n.endswith(tuple(TARGETS))}
    fastpeft.unload(fastpeft.inject(base, fastpeft.LoraConfig(**LORA)))
    for path, (bits, cls, weight_cls) in before.items():
        module = base.get_submodule(path)
        assert type(module) is cls and type(module.weight) is weight_cls
        assert all(torch.equal(a, b) for a, b in zip(_stored_bits(module), bits, strict=True))


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_merging_a_deep_copy_leaves_the_original_alone(model_dir, name):
    """bitsandbytes' 4-bit weight points its state at its layer, a deep copy's at the original's:
    merging the copy requantizes into the copy's own layer, whose module-level state (what an
    FSDP2-gathered weight is read with) is then the new weight's, and leaves the original's."""
    original = fastpeft.inject(_load(model_dir, dict(MODEL_SETTINGS)[name]), fastpeft.LoraConfig(**LORA))
    copied = copy.deepcopy(original)
    base = original.get_submodule("model.layers.0.self_attn.q_proj").base_module()
    state = (lambda m: m.quant_state) if name == "nf4-dq" else (lambda m: m.state.SCB)
    weight_state = (lambda m: m.weight.quant_state) if name == "nf4-dq" else (lambda m: m.weight.SCB)
    before = state(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = fastpeft.merge_and_unload(copied)
    assert state(base) is before and weight_state(base) is before
    layer = merged.get_submodule("model.layers.0.self_attn.q_proj")
    assert state(layer) is weight_state(layer) and state(layer) is not before


def _stored_bits(module: nn.Module) -> list[torch.Tensor]:
    """The bytes a quantized layer stores its weight in (``_bits``)."""
    return _bits(module.weight.data)


def _bits(t: torch.Tensor) -> list[torch.Tensor]:
    """A stored tensor's bytes (bf16-packed codes hold NaN patterns: compare bits, not values):
    bitsandbytes' packed data and other tensors as they are, torchao's int8 data and scales, its
    NF4 codes, scales and factors."""
    if hasattr(t, "qdata"):
        return [t.qdata.clone(), *_bits(t.scale)]
    if hasattr(t, "quantized_data"):
        return [t.quantized_data.clone(), t.quantized_scalers.clone(), *_bits(t.quantization_factor)]
    # a dense copy (torchao keeps 1-element tensors with strides > 1), viewed as bytes
    return [t.clone(memory_format=torch.contiguous_format).view(torch.uint8)]


def test_other_quantizers_are_refused_by_name_and_the_model_is_unchanged():
    class QuantLinear(nn.Module):  # the class auto-gptq's layers have, in its package
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))

    QuantLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda"
    model = nn.Sequential()
    model.add_module("q_proj", QuantLinear())
    with pytest.raises(ValueError, match=r"q_proj \(QuantLinear, quantized by GPTQ\).*bitsandbytes Linear4bit"):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["q_proj"]))
    assert type(model.q_proj) is QuantLinear


@pytest.mark.skipif(not TORCHAO_INSTALLED, reason="needs torchao")
@pytest.mark.parametrize("quantize,message", [
    (lambda tq, m: tq.quantize_(m, tq.Int8DynamicActivationInt8WeightConfig()), "quantizes its activations"),
    (lambda tq, m: tq.quantize_(m, tq.Int8WeightOnlyConfig(granularity=tq.PerGroup(16), set_inductor_config=False)),
     "per-group"),
    (lambda tq, m: tq.quantize_(m, tq.IntxWeightOnlyConfig()), r"quantized by torchao \(other than"),
], ids=["dynamic-activation", "per-group", "intx"])
def test_torchao_weights_fastpeft_does_not_take_are_refused(quantize, message):
    import torchao.quantization as tq

    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(256, 64))  # 16384 elements: to_nf4's smallest
    quantize(tq, model)
    weight = model.q_proj.weight
    with pytest.raises(ValueError, match=message):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["q_proj"]))
    assert type(model.q_proj) is nn.Linear and model.q_proj.weight is weight


def test_a_layer_repacked_for_bitsandbytes_cpu_inference_is_refused(model_dir):
    """bitsandbytes rewrites a 4-bit weight in place for its CPU inference kernel (an eval
    forward without grad on an AVX512-BF16 CPU); such a layer is refused, naming why."""
    model = _load(model_dir, MODEL_SETTINGS[0][1])
    model.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked"):
        fastpeft.inject(model, fastpeft.LoraConfig(**LORA))
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())


def test_an_8bit_layer_with_fp16_weights_is_refused():
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True)
    model = nn.Sequential()
    model.add_module("q_proj", layer)
    with pytest.raises(ValueError, match="has_fp16_weights"):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["q_proj"]))


# The state-dict layouts: NF4 with double quantization, int8, torchao's int8 and NF4.
SERVED = [(n, s) for n, s in MODEL_SETTINGS if n != "fp4-bf16"]


@pytest.mark.parametrize("name,settings", MODEL_SETTINGS, ids=[n for n, _ in MODEL_SETTINGS])
def test_multi_adapter_serving_on_a_quantized_base_matches_peft(model_dir, tmp_path, name, settings):
    """Two PEFT QLoRA adapters served in one mixed batch by ``MultiAdapterModel`` on the same
    quantized base (and a base-only sequence): PEFT's ``adapter_names`` batch's logits."""
    dirs = {}
    for i, adapter in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        peft.get_peft_model(_load(model_dir, settings), peft.LoraConfig(**LORA)).save_pretrained(tmp_path / adapter)
        dirs[adapter] = tmp_path / adapter
    theirs = peft.PeftModel.from_pretrained(_load(model_dir, settings), dirs["a"], adapter_name="a")
    theirs.load_adapter(dirs["b"], adapter_name="b")
    ours = fastpeft.MultiAdapterModel(_load(model_dir, settings), max_adapters=2, max_rank=4, target_modules=TARGETS)
    for adapter, directory in dirs.items():
        ours.load_adapter(adapter, directory)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(3))
    # PEFT's mixed batch wants eval mode; bitsandbytes' layers (the targets' and the others')
    # stay in training mode, its exact CPU forward: eval mode under no_grad repacks 4-bit weights
    # in place for an approximate kernel and quantizes int8 activations
    theirs.eval()
    for module in theirs.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module.train()
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=["a", "__base__", "b"]).logits
        got = ours.train()(input_ids=ids, adapter_names=["a", None, "b"]).logits
    # bf16 compute (fp4-bf16): both sides round the base product in bf16, then add the LoRA term
    # in their own order
    assert _rel(got, expected) <= (1.6e-2 if name == "fp4-bf16" else 1e-4)


TRAINED = MODEL_SETTINGS


@pytest.mark.parametrize("name,settings", TRAINED, ids=[n for n, _ in TRAINED])
def test_trainer_trains_checkpoints_and_resumes_a_quantized_model(model_dir, tmp_path, name, settings):
    """transformers' Trainer takes a quantized model carrying a fastpeft adapter (it refuses
    quantized models without adapters); its checkpoints hold the adapter, and a run resumed
    halfway on a fresh quantized model logs the uninterrupted run's losses and ends with its
    adapter: resumed with ``enable_adapter_checkpoints`` or (Trainer reading the Trainer copy,
    ``model.safetensors``, into the quantized model non-strictly) without it. ``unload`` takes
    the model back to a plain quantized one."""
    from fastpeft.api import adapter_state_dict
    from tests.helpers.trainer import SAVE_STEPS, STEPS, CountingDataset, step_logs, training_args

    def run(lora_seed: int, out, resume=None, line=True):
        model = _load(model_dir, settings)
        torch.manual_seed(lora_seed)
        fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
        trainer = transformers.Trainer(model=model, args=training_args(out), train_dataset=CountingDataset())
        if line:
            fastpeft.integrations.enable_adapter_checkpoints(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(0, tmp_path / "whole")
    assert (tmp_path / "whole" / f"checkpoint-{SAVE_STEPS}" / "adapter_model.safetensors").is_file()
    final = adapter_state_dict(whole.model)
    for line in (True, False):
        resumed = run(1, tmp_path / f"resumed-{line}", str(tmp_path / "whole" / f"checkpoint-{SAVE_STEPS}"), line)
        expected, got = ({s: log for s, log in step_logs(t).items() if s > SAVE_STEPS} for t in (whole, resumed))
        assert sorted(got) == list(range(SAVE_STEPS + 1, STEPS + 1))
        for step, log in got.items():
            assert log["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), (line, step)
        for key, value in adapter_state_dict(resumed.model).items():
            assert _rel(value, final[key]) <= 1e-5, (line, key)
    model = fastpeft.unload(whole.model)
    assert not getattr(model, "_hf_peft_config_loaded", False)
    if name == TORCHAO_NF4:  # quantized after loading: transformers does not know the model is
        return
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=training_args(tmp_path / "again"), train_dataset=CountingDataset())


def test_under_autocast_as_peft(model_dir):
    """Under CPU autocast to bf16 the adapted quantized model computes what PEFT's does, to
    bf16's tolerance."""
    settings = MODEL_SETTINGS[0][1]
    theirs = _peft_model(model_dir, settings)
    ours = fastpeft.inject(_load(model_dir, settings), fastpeft.LoraConfig(**LORA))
    _copy_adapter(theirs, ours)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(**_inputs()).logits, theirs(**_inputs()).logits
    assert out.dtype == ref.dtype
    assert _rel(out, ref) <= 1.6e-2


@pytest.mark.parametrize("name,settings", SERVED, ids=[n for n, _ in SERVED])
def test_state_dicts_hold_bitsandbytes_entries_and_refuse_base_loads(model_dir, tmp_path, name, settings):
    """An adapted quantized model's state dict has bitsandbytes' entries for each base (as the
    unadapted model's) beside A and B, in both the one-adapter and the serving layers; loading
    base entries back is refused before anything changes (an int8 layer would keep stale
    scales), adapter entries load; ``save_pretrained(state_dict=...)`` (Trainer under FSDP /
    DeepSpeed) takes the adapter out of the state dict with its bitsandbytes entries."""
    plain = _load(model_dir, settings).state_dict()
    ours = fastpeft.inject(_load(model_dir, settings), fastpeft.LoraConfig(**LORA))
    served = fastpeft.MultiAdapterModel(_load(model_dir, settings), max_adapters=2, max_rank=4,
                                        target_modules=TARGETS).state_dict()
    state = ours.state_dict()
    base = {k for k in plain if ".q_proj." in k}
    assert base < set(state) and {f"model.{k}" for k in base} < set(served)
    assert {k for k in state if ".q_proj." in k} - base == {
        f"model.layers.{i}.self_attn.q_proj.lora_{m}.weight" for i in (0, 1) for m in "AB"}
    before = {k: _bits(v) for k, v in state.items() if "lora_" not in k}
    with pytest.raises(RuntimeError, match="cannot be loaded into an adapted quantized layer"):
        ours.load_state_dict(state, strict=False)
    for key, value in ours.state_dict().items():  # bits, not values: bf16 storage holds NaN patterns
        if key in before:
            assert all(torch.equal(a, b) for a, b in zip(_bits(value), before[key], strict=True)), key
    assert not ours.load_state_dict({k: v for k, v in state.items() if "lora_" in k}, strict=False).unexpected_keys
    if name == TORCHAO_NF4:  # transformers cannot save an NF4Tensor weight (no storage), adapted or not
        return
    ours.save_pretrained(tmp_path / "given", state_dict=ours.state_dict())
    saved = safetensors.torch.load_file(tmp_path / "given" / "adapter_model.safetensors")
    expected = adapter_state_dict(ours)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())


def test_from_peft_refuses_a_repacked_layer_before_any_change(model_dir):
    theirs = _peft_model(model_dir, MODEL_SETTINGS[0][1])
    layer = theirs.base_model.model.model.layers[1].mlp.down_proj.base_layer
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked"):
        fastpeft.from_peft(theirs)
    assert not any(isinstance(m, QuantLoRALinear) for m in theirs.modules())


# DoRA on the quantized bases (PEFT's "QDoRA"): the same adapter with use_dora=True.
DORA = dict(LORA, use_dora=True)


def _peft_dora(model_dir, settings):
    """PEFT's DoRA on the quantized base, its magnitudes moved off their init."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_load(model_dir, settings), peft.LoraConfig(**DORA)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def _our_dora_name(name: str) -> str:
    name = name.replace("base_model.model.", "")
    return name.replace(".default.weight", "") if "lora_magnitude_vector" in name else name.replace(".default", "")


@pytest.mark.parametrize("name,settings", MODEL_SETTINGS, ids=[n for n, _ in MODEL_SETTINGS])
def test_dora_on_quantized_bases_equals_pefts(model_dir, tmp_path, name, settings):
    """QDoRA: the magnitudes initialised as PEFT's (the row norms of the dequantized weight),
    logits and the gradients of A, B and the magnitudes as PEFT's (training mode, no dropout),
    the adapter files both ways, and a merge (requantized c * (W + s B A)) that computes the
    unmerged model within the requantization's rounding, as PEFT's bitsandbytes merge does
    (PEFT's torchao merge drops DoRA's scale; PEFT's DoRA cannot run on torchao's NF4)."""
    from fastpeft.methods.lora.dora_layer import QuantDoRALinear

    fresh = fastpeft.inject(_load(model_dir, settings), fastpeft.LoraConfig(**DORA))
    layers = [m for m in fresh.modules() if isinstance(m, QuantDoRALinear)]
    assert layers  # every target the quantizer quantized (torchao's NF4 takes some shapes only)
    for layer in layers:  # PEFT's init: the row norms of the dequantized weight plus s B A
        dense = quantized_weight(layer.base_module()).dequantize(torch.float32).double()
        lora = layer.lora_B.weight.double() @ layer.lora_A.weight.double()
        assert _rel(layer.lora_magnitude_vector, torch.linalg.norm(dense + layer.scaling * lora, dim=1)) <= 1e-5
    if name == TORCHAO_NF4:  # PEFT's DoRA cannot dequantize torchao's NF4Tensor: fastpeft's runs
        with pytest.raises(TypeError, match="dequantize"):
            _peft_dora(model_dir, settings)
        out = fresh(**_inputs())
        out.loss.backward()
        assert torch.isfinite(out.logits).all() and all(p.grad is not None for p in fresh.parameters()
                                                        if p.requires_grad)
        return

    theirs = _peft_dora(model_dir, settings)
    ours = fastpeft.inject(_load(model_dir, settings), fastpeft.LoraConfig(**DORA))
    assert isinstance(ours.get_submodule("model.layers.0.self_attn.q_proj"), QuantDoRALinear)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for key, value in theirs.named_parameters():
            if value.requires_grad:
                params[_our_dora_name(key)].copy_(value)
    out, ref = ours(**_inputs()), theirs(**_inputs())
    tolerance = 1.6e-2 if name == "fp4-bf16" else 1e-4  # bf16 compute: each side rounds in its own order
    assert _rel(out.logits, ref.logits) <= tolerance
    out.loss.backward()
    ref.loss.backward()
    peft_grads = {_our_dora_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(peft_grads) == 6 * len(TARGETS)  # A, B and m of each target in 2 layers
    for key, grad in peft_grads.items():
        assert _rel(params[key].grad, grad) <= (5e-2 if name == "fp4-bf16" else 1e-3), key

    ours.train()
    with torch.no_grad():
        reference = ours(**_inputs()).logits
    fastpeft.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    for directory in (tmp_path / "ours", tmp_path / "peft"):
        loaded = fastpeft.load_adapter(_load(model_dir, settings), directory).train()
        with torch.no_grad():
            got = loaded(**_inputs()).logits
        assert _rel(got, reference if directory.name == "ours" else ref.logits.detach()) <= tolerance, directory.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = fastpeft.merge_and_unload(ours)
        with torch.no_grad():
            merged_logits = merged(**_inputs()).logits
        # requantizing c * (W + s B A) costs the quantization's own rounding (4-bit: ~9% of the
        # weight's norm, see the LoRA merge test); PEFT's merge below is the tight check
        assert _rel(merged_logits, reference) <= (2e-2 if name in ("int8", TORCHAO) else 0.3)
        if name != TORCHAO:  # PEFT's torchao layer merges the plain LoRA delta, dropping DoRA's scale
            with torch.no_grad():
                assert _rel(merged_logits, theirs.merge_and_unload()(**_inputs()).logits) <= 1e-3  # both requantize


@pytest.mark.parametrize("name,settings", MODEL_SETTINGS[:3], ids=[n for n, _ in MODEL_SETTINGS[:3]])
def test_dora_with_dropout_on_quantized_bases_equals_pefts(model_dir, name, settings):
    """QDoRA in training mode with dropout (PEFT's three terms: base, (c - 1) x' W^T, c s x' A^T
    B^T): both draw the dropout mask with torch's generator, once per layer in the same order,
    so from one seed they drop the same elements; logits and A / B / m gradients equal PEFT's."""
    config = dict(DORA, lora_dropout=0.3)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_load(model_dir, settings), peft.LoraConfig(**config)).train()
    ours = fastpeft.inject(_load(model_dir, settings), fastpeft.LoraConfig(**config)).train()
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for key, value in theirs.named_parameters():
            if value.requires_grad:
                params[_our_dora_name(key)].copy_(value * (1.1 if "magnitude" in key else 1.0))
                value.mul_(1.1 if "magnitude" in key else 1.0)
    outputs = []
    for model in (theirs, ours):
        torch.manual_seed(7)
        outputs.append(model(**_inputs()))
        outputs[-1].loss.backward()
    ref, out = outputs
    tolerance = 1.6e-2 if name == "fp4-bf16" else 1e-4
    assert _rel(out.logits, ref.logits) <= tolerance
    torch.manual_seed(8)
    assert _rel(ours(**_inputs()).logits, out.logits) > 1e-3  # another mask: dropout is on
    for key, p in theirs.named_parameters():
        if p.requires_grad:
            assert _rel(params[_our_dora_name(key)].grad, p.grad) <= (5e-2 if name == "fp4-bf16" else 1e-3), key
