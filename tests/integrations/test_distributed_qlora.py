"""A QLoRA model under FSDP2: two CPU processes (gloo, 127.0.0.1 only) shard a tiny Llama that
transformers loaded with bitsandbytes (``fully_shard`` per decoder layer and the root, the
quantized base weights included), train its fastpeft adapter on halves of each batch, and must
reproduce one process on the full batches (``tests/helpers/distributed.py`` spawns the ranks).

Settings: NF4 with double quantization stored as uint8 (bitsandbytes' default) and as bf16
(``bnb_4bit_quant_storage``, the FSDP1 recipe), both adapting q/v/down (the other layers run
bitsandbytes' own forward), the first also with each ``lora_A`` / ``lora_B`` sharded as an FSDP
unit of its own (``shard_adapters_apart``); int8 adapting every linear (bitsandbytes' own int8 forward cannot
run on FSDP2's all-gathered plain weight: its other layers would need ``ignored_params``).
FSDP2 all-gathers each packed weight into a plain tensor of the same bytes, without
bitsandbytes' quantization state: the adapted layers read it from the module
(``fastpeft.methods.quantized_base.stash_quantization_state``). A mixed-precision policy that
value-casts bf16-stored codes to fp16 is refused with a clear error instead of training on
garbage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fastpeft
from fastpeft.integrations import load_adapter_weights
from fastpeft.methods.lora.layer import QuantLoRALinear
from tests.helpers.distributed import (
    PER_RANK,
    WORLD,
    adamw_steps,
    full,
    outcome,
    rank_process_group,
    shard_adapters_apart,
    shard_decoder_layers,
    spawn_ranks,
)
from tests.helpers.numerics import TOLERANCE, assert_close, relative_error
from tests.helpers.quantized import MODEL_SETTINGS, load_quantized, save_tiny_llama
from tests.helpers.training import one_thread

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytest.importorskip("transformers")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

STEPS = 2
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4_DQ = dict(MODEL_SETTINGS)["nf4-dq"]
# torch's get_model_state_dict maps each state-dict key to a module attribute, and bitsandbytes'
# Linear8bitLt writes keys that are none (SCB, weight_format): it fails on 8-bit models with or
# without fastpeft, so the full-state-dict save is checked on the 4-bit ones.
# (settings, target modules, how FSDP2 shards the model) per scenario; "lora-apart" shards each
# layer's lora_A and lora_B as FSDP units of their own (the layer then calls them)
SCENARIOS = {
    "nf4-dq-uint8-storage": (NF4_DQ, ["q_proj", "v_proj", "down_proj"], shard_decoder_layers),
    "nf4-dq-bf16-storage": ({**NF4_DQ, "bnb_4bit_quant_storage": torch.bfloat16}, ["q_proj", "v_proj", "down_proj"],
                            shard_decoder_layers),
    "int8-all-linears": (dict(MODEL_SETTINGS)["int8"], ALL_LINEARS, shard_decoder_layers),
    "nf4-dq-lora-apart": (NF4_DQ, ["q_proj", "v_proj", "down_proj"], shard_adapters_apart),
}


def _adapted(model_dir: Path, scenario: str) -> nn.Module:
    settings, targets, _ = SCENARIOS[scenario]
    model = load_quantized(model_dir, settings)
    torch.manual_seed(1)
    return fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False)).train()


def _fsdp2(model: nn.Module, scenario: str, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    return SCENARIOS[scenario][2](model, mesh=init_device_mesh("cpu", (WORLD,)), **kwargs)


def _train(model: nn.Module, wrapped: nn.Module, rows: slice) -> dict:
    """``STEPS`` AdamW steps on ``rows`` of each full batch: the first step's LoRA gradients,
    the LoRA parameters before and after, whether the adapted layers' base weights were
    sharded (DTensors) while training."""
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = adamw_steps(model, wrapped, rows, STEPS)
    adapted = [m for m in model.modules() if isinstance(m, QuantLoRALinear)]
    return {"grads": grads, "init": {n: full(p) for n, p in init.items()},
            "final": {n: full(p.detach()) for n, p in model.named_parameters() if n in init},
            "base_sharded": bool(adapted) and all(isinstance(m.weight, DTensor) for m in adapted)}


def _cast_codes_error(model_dir: Path) -> str:
    """The error of a forward after FSDP2 value-casts bf16-stored 4-bit codes to fp16."""
    model = _adapted(model_dir, "nf4-dq-bf16-storage")
    wrapped = _fsdp2(model, "nf4-dq-bf16-storage", MixedPrecisionPolicy(param_dtype=torch.float16))
    ids = torch.zeros(1, 4, dtype=torch.int64)
    try:
        wrapped(input_ids=ids)
    except ValueError as error:
        return str(error)
    return "no error"


def _reloaded(model_dir: Path, scenario: str, trained: nn.Module, saved: Path) -> dict:
    """The adapter saved from the trained sharded model, loaded into a fresh sharded one
    (``load_adapter_weights``, what resuming does): its LoRA parameters, whole; and the
    adapter rank 0 saves from the trained model's full state dict (what Trainer passes
    ``save_pretrained`` under FSDP) into ``<saved>-from-state-dict``."""
    fresh = _adapted(model_dir, scenario)
    _fsdp2(fresh, scenario)
    load_adapter_weights(fresh, saved)
    if SCENARIOS[scenario][0].get("load_in_4bit"):
        state_dict = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            fastpeft.save_adapter(trained, f"{saved}-from-state-dict", state_dict=state_dict)
    return {"resumed": {n: full(p.detach()) for n, p in fresh.named_parameters() if p.requires_grad}}


def _load_into_sharded_error(model_dir: Path, adapter: Path) -> str:
    """The ``outcome`` of ``load_adapter`` into a quantized model already sharded with FSDP2."""
    model = load_quantized(model_dir, NF4_DQ)
    shard_decoder_layers(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return outcome(lambda: fastpeft.load_adapter(model, adapter))


def _worker(rank: int, port: int, out_dir: str) -> None:
    model_dir = Path(out_dir) / "model"
    with rank_process_group(rank, port):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for scenario in SCENARIOS:
            model = _adapted(model_dir, scenario)
            results[scenario] = _train(model, _fsdp2(model, scenario), rows)
            saved = Path(out_dir) / f"{scenario}-adapter"
            fastpeft.save_adapter(model, saved)  # every rank: a collective
            results[scenario].update(_reloaded(model_dir, scenario, model, saved))
        results["cast_codes_error"] = _cast_codes_error(model_dir)
        first_adapter = Path(out_dir) / f"{next(iter(SCENARIOS))}-adapter"
        results["load_into_sharded"] = _load_into_sharded_error(model_dir, first_adapter)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora-ranks")
    save_tiny_llama(out / "model")
    return out


@pytest.fixture(scope="module")
def rank_results(ranks_dir) -> list[dict]:
    return spawn_ranks(_worker, ranks_dir, "FSDP2 QLoRA")


@pytest.fixture(scope="module")
def single_process(ranks_dir) -> dict:
    """The reference: one process, no wrapper, the full batches."""
    with one_thread():
        results = {}
        for scenario in SCENARIOS:
            model = _adapted(ranks_dir / "model", scenario)
            results[scenario] = _train(model, model, slice(None))
        return results


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_training_equals_one_process(rank_results, single_process, scenario):
    """The base weights were sharded; each rank's first-step LoRA gradients equal one process's
    on the whole batch; after the AdamW steps both ranks hold the same LoRA parameters, updated
    as the single process updated them."""
    expected = single_process[scenario]
    first, second = (results[scenario] for results in rank_results)
    assert first["base_sharded"] and second["base_sharded"]
    assert not expected["base_sharded"]
    assert expected["grads"] and first["grads"].keys() == expected["grads"].keys()
    for rank, results in enumerate(rank_results):
        for name, grad in expected["grads"].items():
            assert grad.abs().sum() > 0, f"{name}: zero gradient"
            assert_close(results[scenario]["grads"][name], grad, torch.float32, f"rank {rank} grad of {name}")
    for name, value in first["final"].items():
        assert torch.equal(value, second["final"][name]), f"{name} differs between ranks"
        update = value - first["init"][name]
        want = expected["final"][name] - expected["init"][name]
        assert update.abs().sum() > 0, f"{name} did not train"
        # Adam divides by sqrt(v): near-zero gradients amplify rounding, hence 10x fp32 tolerance.
        err = relative_error(update, want)
        assert err <= 10 * TOLERANCE[torch.float32], f"update of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_sharded_quantized_model_saves_its_adapter(rank_results, ranks_dir, scenario):
    """``save_adapter`` on the sharded QLoRA model writes the trained LoRA weights whole, which
    ``load_adapter`` reads into a freshly loaded quantized model."""
    final = rank_results[0][scenario]["final"]
    loaded = fastpeft.load_adapter(load_quantized(ranks_dir / "model", SCENARIOS[scenario][0]),
                                   ranks_dir / f"{scenario}-adapter")
    params = dict(loaded.named_parameters())
    assert final and all(torch.equal(params[name], value) for name, value in final.items())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_sharded_quantized_model_resumes_and_saves_from_its_state_dict(rank_results, ranks_dir, scenario):
    """The saved adapter loaded into a fresh sharded QLoRA model (rank 0 reads, shards
    scattered) gives every rank the trained LoRA weights; the adapter saved from the full
    state dict (4-bit bases) has the same files as the collective save."""
    final = rank_results[0][scenario]["final"]
    for rank, results in enumerate(rank_results):
        resumed = results[scenario]["resumed"]
        assert resumed.keys() == final.keys()
        assert all(torch.equal(resumed[name], value) for name, value in final.items()), f"rank {rank}"
    if not SCENARIOS[scenario][0].get("load_in_4bit"):
        return  # torch's full state dict fails on bitsandbytes' 8-bit layers (above)
    collective, from_state_dict = ranks_dir / f"{scenario}-adapter", ranks_dir / f"{scenario}-adapter-from-state-dict"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (collective / name).read_bytes() == (from_state_dict / name).read_bytes(), name


def test_loading_into_a_sharded_quantized_model_is_refused(rank_results):
    """FSDP2's shards of a quantized weight lack its quantization state: ``load_adapter`` into
    a quantized model already sharded says to load first, then shard."""
    for results in rank_results:
        message = results["load_into_sharded"]
        assert message.startswith("ValueError") and "quantized layers" in message and "load the adapter first, then fully_shard" in message, message


def test_value_cast_codes_are_refused(rank_results):
    """bf16-stored codes under ``MixedPrecisionPolicy(param_dtype=torch.float16)``: FSDP2 casts
    their values, which destroys them; the forward says so and how to avoid it."""
    for results in rank_results:
        message = results["cast_codes_error"]
        assert "packed as torch.bfloat16" in message and "torch.float16" in message, message
        assert "bnb_4bit_quant_storage=torch.uint8" in message
