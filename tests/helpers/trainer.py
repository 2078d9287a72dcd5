"""HF ``transformers.Trainer`` runs of the training tests: a dataset of counting sequences
(``tests/helpers/training.py``'s task), CPU training arguments for a few steps, and what a
run's checkpoints and logs hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from tests.helpers.training import shift_batch

transformers = pytest.importorskip("transformers")

# The run ``training_args`` sets up: STEPS steps, a checkpoint every SAVE_STEPS (halfway and at the end).
STEPS = 6
SAVE_STEPS = 3
# What Trainer writes next to the adapter in a checkpoint (PEFT's checkpoints also hold its
# model card, README.md, which fastpeft does not write).
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
# transformers' SAFE_WEIGHTS_NAME: the Trainer copy of the adapter (its tensors under the
# model's keys) that a fastpeft model's save_pretrained writes beside the adapter's files,
# from which Trainer resumes without enable_adapter_checkpoints.
TRAINER_COPY = "model.safetensors"


class CountingDataset(torch.utils.data.Dataset):
    """``size`` counting sequences as Trainer's dicts (the model shifts the labels)."""

    def __init__(self, size: int = 16, length: int = 12, seed: int = 0) -> None:
        self.ids = shift_batch(torch.Generator().manual_seed(seed), batch=size, length=length)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir: Path, **overrides) -> transformers.TrainingArguments:
    """CPU ``TrainingArguments`` for a ``STEPS``-step run saving every ``SAVE_STEPS``, logging
    every step; ``overrides`` replace any of them."""
    settings = dict(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_STEPS, logging_steps=1,
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def checkpointing_args() -> dict:
    """Gradient checkpointing in the installed transformers' words (renamed in 5.x)."""
    if "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": True}
    return {"gradient_checkpointing": True}


def step_logs(trainer: transformers.Trainer) -> dict[int, dict]:
    """``{step: {"loss", "grad_norm", "learning_rate"}}`` of the training steps logged."""
    return {
        entry["step"]: {k: entry[k] for k in ("loss", "grad_norm", "learning_rate")}
        for entry in trainer.state.log_history if "loss" in entry
    }


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the model (its adapter's, a prompt encoder's MLP / LSTM
    included), detached copies under its state-dict keys."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_trainer_copy(directory: Path, model: torch.nn.Module) -> None:
    """``directory``'s Trainer copy holds exactly the model's trainable tensors, under its own
    keys, equal to them, and is marked as fastpeft's adapter-only copy."""
    path = directory / TRAINER_COPY
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"fastpeft": "adapter-only"}  # one entry: byte-deterministic
    saved, expected = safetensors.torch.load_file(path), trainable_state(model)
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
