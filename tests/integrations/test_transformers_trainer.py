"""fastpeft models trained with HF ``transformers.Trainer``: checkpoints hold the adapter in
PEFT's format (not the base weights) and the Trainer copy of it (``model.safetensors``: its
tensors under the model's keys), PEFT and fastpeft load them, resuming continues with the
losses of an uninterrupted run and ``load_best_model_at_end`` loads the best adapter, with
``enable_adapter_checkpoints`` and without it (Trainer reading the copy), and gradient
checkpointing and ``bf16=True`` (CPU autocast) train. Also the adapter-only
``save_pretrained`` that makes this work, and the README's recipe.

Everything runs on the CPU (``use_cpu=True``) with a 2-layer random Llama (no downloads) on
the counting task of ``tests/helpers/training.py``, for a few steps (the Trainer pieces
the adapter types' Trainer tests share are in ``tests/helpers/trainer.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft.api import adapter_state_dict
from tests.helpers.models import token_ids
from tests.helpers.numerics import TOLERANCE, relative_error
from tests.helpers.trainer import (
    SAVE_STEPS,
    STEPS,
    TRAINER_COPY,
    TRAINER_FILES,
    CountingDataset,
    check_trainer_copy,
    checkpointing_args,
    step_logs,
    training_args,
)
from tests.helpers.training import build_model, one_thread

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# What a fastpeft model's save_pretrained writes (Trainer's checkpoints, save_model()).
SAVED_FILES = ADAPTER_FILES | {TRAINER_COPY}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def lora_config(library=fastpeft, dropout: float = 0.1):
    return library.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)


def adapted_llama(lora_seed: int = 0, dropout: float = 0.1) -> torch.nn.Module:
    """The base Llama (always the same weights) with a fastpeft adapter initialised from ``lora_seed``."""
    model = build_model("llama")
    torch.manual_seed(lora_seed)
    return fastpeft.inject(model, lora_config(dropout=dropout))


def make_trainer(model: torch.nn.Module, args: transformers.TrainingArguments, line: bool = True,
                 **kwargs) -> transformers.Trainer:
    """A Trainer of ``model``, with ``enable_adapter_checkpoints`` if ``line``."""
    trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingDataset(), **kwargs)
    return fastpeft.integrations.enable_adapter_checkpoints(trainer) if line else trainer


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(directory / "adapter_model.safetensors")


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(token_ids(3, (2, 12))).logits


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[transformers.Trainer, Path]:
    """A full ``STEPS``-step run (checkpoints every ``SAVE_STEPS``) and its output dir,
    after ``trainer.save_model()``."""
    out = tmp_path_factory.mktemp("uninterrupted")
    with one_thread():
        trainer = make_trainer(adapted_llama(), training_args(out))
        trainer.train()
        trainer.save_model()
    return trainer, out


def test_checkpoints_hold_the_adapter_not_the_model(uninterrupted):
    """Each checkpoint and the final save hold the adapter files, its Trainer copy and
    Trainer's state, no base weights: each adapter file is a small fraction of the model's
    weights, and its tensors are the model's adapter at that step."""
    trainer, out = uninterrupted
    full_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    for step in (SAVE_STEPS, STEPS):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert files == SAVED_FILES | TRAINER_FILES
    assert {p.name for p in out.iterdir() if p.is_file()} == SAVED_FILES | {"training_args.bin"}
    for name in ("adapter_model.safetensors", TRAINER_COPY):
        assert (out / name).stat().st_size < full_bytes / 10
    check_trainer_copy(out, trainer.model)
    check_trainer_copy(out / f"checkpoint-{STEPS}", trainer.model)
    final = saved_tensors(out)
    assert final.keys() == adapter_state_dict(trainer.model).keys()
    for key, value in adapter_state_dict(trainer.model).items():
        assert torch.equal(final[key], value), key
        assert torch.equal(saved_tensors(out / f"checkpoint-{STEPS}")[key], value), key
    assert not any(torch.equal(saved_tensors(out / f"checkpoint-{SAVE_STEPS}")[key], value)
                   for key, value in final.items() if "lora_A" in key)


def test_checkpoints_load_in_peft_and_fastpeft(uninterrupted):
    """The final adapter and a checkpoint's load with ``peft.PeftModel.from_pretrained`` and
    ``fastpeft.load_adapter`` into a fresh base model and compute what the trained model does."""
    trainer, out = uninterrupted
    expected = logits(trainer.model)
    for directory in (out, out / f"checkpoint-{STEPS}"):
        theirs = peft.PeftModel.from_pretrained(build_model("llama"), directory)
        ours = fastpeft.load_adapter(build_model("llama"), directory)
        assert relative_error(logits(theirs), expected) <= TOLERANCE[torch.float32]
        assert relative_error(logits(ours), expected) <= TOLERANCE[torch.float32]


def test_checkpoint_contents_match_a_peft_models(uninterrupted, tmp_path):
    """A PEFT model trained the same way writes the same checkpoint files (plus its model
    card; fastpeft's plus the Trainer copy), the same tensor keys and shapes, and the same
    adapter config."""
    trainer, out = uninterrupted
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(build_model("llama"), lora_config(peft))
    transformers.Trainer(model=peft_model, args=training_args(tmp_path, max_steps=SAVE_STEPS),
                         train_dataset=CountingDataset()).train()
    theirs, ours = tmp_path / f"checkpoint-{SAVE_STEPS}", out / f"checkpoint-{SAVE_STEPS}"
    assert {p.name for p in theirs.iterdir()} - {"README.md"} == {p.name for p in ours.iterdir()} - {TRAINER_COPY}
    their_tensors, our_tensors = saved_tensors(theirs), saved_tensors(ours)
    assert {k: v.shape for k, v in their_tensors.items()} == {k: v.shape for k, v in our_tensors.items()}
    their_config, our_config = (
        fastpeft.LoraConfig.from_dict(json.loads((d / "adapter_config.json").read_text())) for d in (theirs, ours)
    )
    # PEFT saves target_modules as a set, in no particular order.
    assert dataclasses.replace(their_config, target_modules=sorted(their_config.target_modules)) == \
        dataclasses.replace(our_config, target_modules=sorted(our_config.target_modules))


@pytest.mark.parametrize("line", [True, False], ids=["enable_adapter_checkpoints", "plain_trainer"])
def test_resume_continues_with_the_uninterrupted_losses(uninterrupted, tmp_path, line, caplog):
    """A fresh model (another LoRA init) resumed from the halfway checkpoint logs the same
    losses, gradient norms and learning rates as the uninterrupted run (adapter, AdamW
    state, scheduler and dropout RNG restored) and ends with the same adapter: with
    ``enable_adapter_checkpoints`` (fastpeft loads the adapter files) and without it (Trainer
    loads the Trainer copy, logging the frozen base's keys as missing)."""
    trainer, out = uninterrupted
    resumed = make_trainer(adapted_llama(lora_seed=1), training_args(tmp_path), line=line)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_STEPS}"))
    # The log history restored from the checkpoint holds steps 1 to SAVE_STEPS already.
    expected, logs = (
        {step: log for step, log in step_logs(t).items() if step > SAVE_STEPS} for t in (trainer, resumed)
    )
    assert sorted(logs) == sorted(expected) == list(range(SAVE_STEPS + 1, STEPS + 1))
    for step, log in logs.items():
        for key, value in log.items():
            assert value == pytest.approx(expected[step][key], rel=1e-5), f"step {step} {key}"
    final = adapter_state_dict(trainer.model)
    for key, value in adapter_state_dict(resumed.model).items():
        assert relative_error(value, final[key]) <= 1e-5, key
    assert ("missing keys" in caplog.text) is not line


def test_resume_from_last_checkpoint_in_output_dir(tmp_path):
    """``resume_from_checkpoint=True`` picks the newest checkpoint of the output dir and
    loads its adapter (the run is already complete, so the model is that adapter)."""
    first = make_trainer(adapted_llama(), training_args(tmp_path, max_steps=SAVE_STEPS))
    first.train()
    again = make_trainer(adapted_llama(lora_seed=1), training_args(tmp_path, max_steps=SAVE_STEPS))
    again.train(resume_from_checkpoint=True)
    expected = adapter_state_dict(first.model)
    for key, value in adapter_state_dict(again.model).items():
        assert torch.equal(value, expected[key]), key


def test_resume_refuses_another_adapter(uninterrupted, tmp_path):
    """A checkpoint of a different adapter (another rank) is refused with the difference named."""
    _, out = uninterrupted
    model = fastpeft.inject(build_model("llama"), fastpeft.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS))
    trainer = make_trainer(model, training_args(tmp_path))
    with pytest.raises(ValueError, match="r: saved 4, model 2"):
        trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_STEPS}"))


@pytest.mark.parametrize("line", [True, False], ids=["enable_adapter_checkpoints", "plain_trainer"])
def test_load_best_model_at_end_loads_the_best_adapter(tmp_path, line):
    """With ``load_best_model_at_end`` the model ends with the best checkpoint's adapter,
    with ``enable_adapter_checkpoints`` and without it (the Trainer copy).
    ``greater_is_better=True`` on the eval loss makes the first checkpoint the best one, so
    the load really changes the trained weights."""
    args = training_args(tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                         metric_for_best_model="loss", greater_is_better=True)
    trainer = make_trainer(adapted_llama(), args, line=line, eval_dataset=CountingDataset(size=8, seed=1))
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = saved_tensors(tmp_path / "checkpoint-2")
    last = saved_tensors(tmp_path / f"checkpoint-{STEPS}")
    for key, value in adapter_state_dict(trainer.model).items():
        assert torch.equal(value, best[key]), key
        assert "lora_B" not in key or not torch.equal(value, last[key]), key


def test_gradient_checkpointing_trains_like_a_plain_run(uninterrupted, tmp_path):
    """Trainer's gradient checkpointing (with LoRA dropout) logs the uninterrupted run's
    losses and gradient norms."""
    trainer, _ = uninterrupted
    checkpointed = make_trainer(adapted_llama(), training_args(tmp_path, **checkpointing_args()))
    checkpointed.train()
    assert checkpointed.model.is_gradient_checkpointing
    expected = step_logs(trainer)
    for step, log in step_logs(checkpointed).items():
        assert log["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert log["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4), step


def test_bf16_trains_like_peft(tmp_path):
    """``bf16=True`` (CPU autocast) trains the fp32 adapter, with the losses of a PEFT model
    trained the same way, and saves fp32 adapter weights."""
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(build_model("llama"), lora_config(peft, dropout=0.0))
    ours = fastpeft.from_peft(copy.deepcopy(peft_model))
    runs = {}
    for name, model in (("peft", peft_model), ("fastpeft", ours)):
        trainer = transformers.Trainer(model=model, args=training_args(tmp_path / name, bf16=True),
                                       train_dataset=CountingDataset())
        if name == "fastpeft":
            fastpeft.integrations.enable_adapter_checkpoints(trainer)  # as the README recipe does
        trainer.train()
        runs[name] = step_logs(trainer)
    assert len(runs["fastpeft"]) == STEPS
    for step, log in runs["fastpeft"].items():
        # bf16 rounding of the LoRA term differs between the two implementations.
        assert log["loss"] == pytest.approx(runs["peft"][step]["loss"], rel=TOLERANCE[torch.bfloat16]), step
    assert runs["fastpeft"][STEPS]["loss"] < runs["fastpeft"][1]["loss"]
    saved = saved_tensors(tmp_path / "fastpeft" / f"checkpoint-{STEPS}")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_enable_adapter_checkpoints_needs_a_fastpeft_model(tmp_path):
    trainer = transformers.Trainer(model=build_model("llama"), args=training_args(tmp_path))
    with pytest.raises(ValueError, match="no fastpeft adapter"):
        fastpeft.integrations.enable_adapter_checkpoints(trainer)


def test_save_pretrained_writes_the_adapter_until_merged(tmp_path):
    """An adapted transformers model's ``save_pretrained`` writes what ``save_adapter``
    does, plus the Trainer copy (only on the main process); after ``merge_and_unload`` it writes the whole merged
    model again, which ``from_pretrained`` loads."""
    model = adapted_llama()
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight)
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == SAVED_FILES
    check_trainer_copy(tmp_path / "adapter", model)
    model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
    fastpeft.save_adapter(model, tmp_path / "save_adapter")
    assert {p.name for p in (tmp_path / "save_adapter").iterdir()} == ADAPTER_FILES
    for name in ADAPTER_FILES:
        assert (tmp_path / "adapter" / name).read_bytes() == (tmp_path / "save_adapter" / name).read_bytes()
    expected = logits(model)
    fastpeft.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    assert "model.safetensors" in {p.name for p in (tmp_path / "merged").iterdir()}
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert relative_error(logits(reloaded), expected) <= TOLERANCE[torch.float32]


def test_save_pretrained_follows_copies_and_refuses_full_save_options(tmp_path):
    """``copy.deepcopy`` and pickling give the copy a ``save_pretrained`` that saves the
    copy; options of a full save are refused; a given ``state_dict`` (FSDP / DeepSpeed)
    writes the adapter too (``tests/api/test_save_from_state_dict.py``)."""
    model = adapted_llama()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.nn.init.normal_(copied.model.layers[0].self_attn.q_proj.lora_B.weight)
        copied.save_pretrained(tmp_path / "copy")
        assert saved_tensors(tmp_path / "copy").keys() == adapter_state_dict(copied).keys()
        for key, value in adapter_state_dict(copied).items():
            assert torch.equal(saved_tensors(tmp_path / "copy")[key], value), key
    with pytest.raises(TypeError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    model.save_pretrained(tmp_path / "shard", max_shard_size="1GB", safe_serialization=True)
    assert {p.name for p in (tmp_path / "shard").iterdir()} == SAVED_FILES
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())
    assert {p.name for p in (tmp_path / "given").iterdir()} == SAVED_FILES
    check_trainer_copy(tmp_path / "given", model)


def test_from_peft_models_get_adapter_checkpoints(tmp_path):
    """A model converted by ``fastpeft.from_peft`` writes adapter checkpoints, like an
    injected one: with a plain Trainer too (saving needs no hook)."""
    model = fastpeft.from_peft(peft.get_peft_model(build_model("llama"), lora_config(peft)))
    transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=1, save_steps=1),
                         train_dataset=CountingDataset()).train()
    assert {p.name for p in (tmp_path / "checkpoint-1").iterdir()} == SAVED_FILES | TRAINER_FILES


def test_readme_recipe(tmp_path):
    """The README's "Training with Trainer / accelerate" recipe, with the tiny model and
    dataset, on the CPU: bf16 with gradient checkpointing, then a resumed run."""
    from transformers import Trainer, TrainingArguments

    train_dataset = CountingDataset()
    model = build_model("llama")
    # --- README recipe ---
    fastpeft.inject(model, fastpeft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, max_steps=4, save_steps=2, report_to=[],
                             use_cpu=True, **checkpointing_args())
    trainer = fastpeft.integrations.enable_adapter_checkpoints(
        Trainer(model=model, args=args, train_dataset=train_dataset))
    trainer.train()  # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model()  # adapter_config.json + adapter_model.safetensors
    # --- end of recipe ---
    assert {p.name for p in tmp_path.iterdir() if p.is_file()} == SAVED_FILES | {"training_args.bin"}
    check_trainer_copy(tmp_path, model)  # the adapter only, no base weight
    resumed = fastpeft.inject(build_model("llama"), fastpeft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    trainer = fastpeft.integrations.enable_adapter_checkpoints(
        Trainer(model=resumed, args=args, train_dataset=train_dataset))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 4
    peft.PeftModel.from_pretrained(build_model("llama"), tmp_path)
