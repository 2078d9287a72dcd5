"""HF ``transformers.Trainer`` with every fastpeft adapter type but LoRA (``tests/integrations/test_transformers_trainer.py``
covers LoRA): bottleneck adapters (AdapterHub's files) and prompt tuning, prefix tuning (with
and without its MLP) and P-tuning (PEFT's files).

For each type, on the CPU with a tiny random model and a few steps: checkpoints hold only the
adapter in its native files (which ``fastpeft.load_adapter`` loads back into a fresh base
model, computing what the trained model does), resuming from the halfway checkpoint into a
model with another adapter init logs the losses, gradient norms and learning rates of the
uninterrupted run and ends with its adapter (a reparameterization's MLP / LSTM restored from
``fastpeft_prompt_encoder.safetensors``) -- with ``enable_adapter_checkpoints`` and without it
(Trainer loading the Trainer copy, ``model.safetensors``) --, and what cannot work is refused with a message that
says why: a checkpoint of another adapter type or config, a reparameterized prompt checkpoint
without its encoder file, prefix tuning under gradient checkpointing. The cases (base model,
config, native files) are ``tests/helpers/adapter_cases.py``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft.api import adapter_state_dict
from fastpeft.formats.file_names import ENCODER_STATE_NAME
from fastpeft.methods.prompt.model import prompt_encoder
from tests.helpers.adapter_cases import (
    CASES,
    N_VIRTUAL,
    NUM_LABELS,
    PEFT_FILES,
    adapted,
    base_model,
)
from tests.helpers.numerics import TOLERANCE, relative_error
from tests.helpers.trainer import (
    TRAINER_COPY,
    TRAINER_FILES,
    CountingDataset,
    check_trainer_copy,
    checkpointing_args,
    step_logs,
    trainable_state,
    training_args,
)
from tests.helpers.training import VOCAB, build_model, one_thread

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS = 4
SAVE_STEPS = 2  # a checkpoint halfway, one at the end


class LabelledDataset(CountingDataset):
    """Counting sequences labelled by their first token mod ``NUM_LABELS`` (sequence classification)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % NUM_LABELS}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def trainer_for(model: torch.nn.Module, out: Path, eval_dataset=None, line: bool = True,
                **overrides) -> transformers.Trainer:
    """A Trainer of ``model`` for this module's run, with ``enable_adapter_checkpoints`` if ``line``."""
    args = training_args(out, **{"max_steps": STEPS, "save_steps": SAVE_STEPS, **overrides})
    data = LabelledDataset() if isinstance(model, transformers.BertPreTrainedModel) else CountingDataset()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=eval_dataset)
    return fastpeft.integrations.enable_adapter_checkpoints(trainer) if line else trainer


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[transformers.Trainer, Path]]:
    """Per case, an uninterrupted ``STEPS``-step run (checkpoints every ``SAVE_STEPS``) and its
    output dir, after ``trainer.save_model()``."""
    out = {}
    with one_thread():
        for case in CASES:
            directory = tmp_path_factory.mktemp(case)
            trainer = trainer_for(adapted(case), directory)
            trainer.train()
            trainer.save_model()
            out[case] = trainer, directory
    return out


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_hold_the_native_adapter_files(runs, case):
    """Checkpoints and the final save hold the adapter's native files, its Trainer copy and
    Trainer's state, no base weights; the weights are the model's adapter at that step (the halfway one differs),
    and ``fastpeft.load_adapter`` loads them into a fresh base model that computes what the
    trained model does."""
    trainer, out = runs[case]
    native = CASES[case][2]
    weights = (native - {"adapter_config.json", ENCODER_STATE_NAME}).pop()
    for step in (SAVE_STEPS, STEPS):
        assert {p.name for p in (out / f"checkpoint-{step}").iterdir()} == native | {TRAINER_COPY} | TRAINER_FILES
    assert {p.name for p in out.iterdir() if p.is_file()} == native | {TRAINER_COPY, "training_args.bin"}
    check_trainer_copy(out, trainer.model)
    final = safetensors.torch.load_file(out / weights)
    halfway = safetensors.torch.load_file(out / f"checkpoint-{SAVE_STEPS}" / weights)
    expected = adapter_state_dict(trainer.model)
    assert final.keys() == expected.keys() == halfway.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert any(not torch.equal(halfway[key], value) for key, value in expected.items())
    loaded = fastpeft.load_adapter(base_model(CASES[case][0]), out)
    assert relative_error(logits(loaded), logits(trainer.model)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("line", [True, False], ids=["enable_adapter_checkpoints", "plain_trainer"])
@pytest.mark.parametrize("case", CASES)
def test_resume_continues_with_the_uninterrupted_losses(runs, case, tmp_path, line):
    """A fresh model (another adapter init) resumed from the halfway checkpoint logs the
    uninterrupted run's losses, gradient norms and learning rates (adapter, AdamW state,
    scheduler and dropout RNG restored) and ends with its trainable weights, with
    ``enable_adapter_checkpoints`` and without it (Trainer loads the Trainer copy)."""
    trainer, out = runs[case]
    resumed = trainer_for(adapted(case, seed=1), tmp_path, line=line)
    before = trainable_state(resumed.model)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_STEPS}"))
    expected, logs = ({s: log for s, log in step_logs(t).items() if s > SAVE_STEPS} for t in (trainer, resumed))
    assert sorted(logs) == sorted(expected) == list(range(SAVE_STEPS + 1, STEPS + 1))
    for step, log in logs.items():
        for key, value in log.items():
            assert value == pytest.approx(expected[step][key], rel=1e-5), f"step {step} {key}"
    final, ours = trainable_state(trainer.model), trainable_state(resumed.model)
    assert ours.keys() == final.keys()
    for name, value in ours.items():
        assert relative_error(value, final[name]) <= 1e-5, name
        assert not torch.equal(before[name], final[name]), f"{name}: the inits of the two runs are the same"


def test_resume_keeps_the_parameters_the_optimizer_holds(runs):
    """``load_adapter_weights`` copies into the existing parameters (the optimizer's), also a
    reparameterized prompt encoder's."""
    _, out = runs["prefix_mlp"]
    model = adapted("prefix_mlp", seed=1)
    params = dict(model.named_parameters())
    fastpeft.integrations.load_adapter_weights(model, out)
    saved = safetensors.torch.load_file(out / ENCODER_STATE_NAME)
    for name, value in prompt_encoder(model).state_dict(keep_vars=True).items():
        assert value is params[f"fastpeft_prompt_encoder.{name}"]
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize("line", [True, False], ids=["enable_adapter_checkpoints", "plain_trainer"])
def test_load_best_model_at_end_loads_the_best_bottleneck_adapter(tmp_path, line):
    """``load_best_model_at_end`` reloads the best AdapterHub checkpoint (the first one, by
    ``greater_is_better=True`` on the eval loss), not the last weights, with
    ``enable_adapter_checkpoints`` and without it (the Trainer copy)."""
    args = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                greater_is_better=True)
    trainer = trainer_for(adapted("seq_bn"), tmp_path, CountingDataset(size=8, seed=1), line=line, **args)
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{SAVE_STEPS}"
    best = safetensors.torch.load_file(tmp_path / f"checkpoint-{SAVE_STEPS}" / "adapter.safetensors")
    last = safetensors.torch.load_file(tmp_path / f"checkpoint-{STEPS}" / "adapter.safetensors")
    current = adapter_state_dict(trainer.model)
    assert current.keys() == best.keys()
    assert all(torch.equal(value, best[key]) for key, value in current.items())
    assert not all(torch.equal(value, last[key]) for key, value in current.items())


def test_resume_refuses_another_adapter(runs, tmp_path):
    """A checkpoint of another adapter type, or of the same type with another config, is
    refused with the difference named, before the model changes."""
    _, bottleneck_out = runs["seq_bn"]
    _, prompt_out = runs["prompt"]
    cases = [
        (adapted("seq_bn"), prompt_out, "holds a PROMPT_TUNING adapter, the model has a bottleneck"),
        (adapted("prompt"), bottleneck_out, "holds a bottleneck .* the model has a PROMPT_TUNING adapter"),
        (fastpeft.inject(build_model("llama"), fastpeft.AdapterConfig("seq_bn", reduction_factor=2, dropout=0.1)),
         bottleneck_out, "reduction_factor: saved 4, model 2"),
        (fastpeft.inject(build_model("llama"), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=5)),
         prompt_out, "num_virtual_tokens: saved 3, model 5"),
    ]
    for model, checkpoint, message in cases:
        before = trainable_state(model)
        with pytest.raises(ValueError, match=message):
            trainer_for(model, tmp_path).train(resume_from_checkpoint=str(checkpoint / f"checkpoint-{SAVE_STEPS}"))
        assert all(torch.equal(value, before[name]) for name, value in trainable_state(model).items())


def test_reparameterized_prompt_checkpoint_needs_its_encoder_file(runs, tmp_path):
    """Without ``fastpeft_prompt_encoder.safetensors`` (PEFT's own checkpoint, or a copy that
    lost it) a prefix-MLP checkpoint cannot restore the MLP it trains: refused, saying so."""
    _, out = runs["prefix_mlp"]
    for name in PEFT_FILES:
        (tmp_path / name).write_bytes((out / f"checkpoint-{SAVE_STEPS}" / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="computed PREFIX_TUNING prompts, not the reparameterization"):
        fastpeft.integrations.load_adapter_weights(adapted("prefix_mlp"), tmp_path)


def test_prefix_tuning_refuses_gradient_checkpointing(tmp_path):
    """Prefix tuning under Trainer's gradient checkpointing would add the prefix twice: refused."""
    trainer = transformers.Trainer(model=adapted("prefix"), args=training_args(tmp_path, **checkpointing_args()),
                                   train_dataset=CountingDataset())
    with pytest.raises(ValueError, match="prefix tuning does not work with gradient checkpointing"):
        fastpeft.integrations.enable_adapter_checkpoints(trainer)


@pytest.mark.parametrize("case", ["scaled_par_bn", "ptuning_lstm"])
def test_save_pretrained_writes_the_adapter_until_unloaded(case, tmp_path):
    """An injected model's ``save_pretrained`` writes ``save_adapter``'s native files (and a
    P-tuning encoder's state, byte for byte the model's); after ``fastpeft.unload`` (or
    ``merge_prefix``, whose stored prompts PEFT's file restores) the extra file goes, and an
    unloaded model saves in full again."""
    model = adapted(case)
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == CASES[case][2] | {TRAINER_COPY}
    check_trainer_copy(tmp_path / "adapter", model)
    fastpeft.save_adapter(model, tmp_path / "save_adapter")
    assert {p.name for p in (tmp_path / "save_adapter").iterdir()} == CASES[case][2]
    for name in CASES[case][2] - {ENCODER_STATE_NAME}:
        assert (tmp_path / "adapter" / name).read_bytes() == (tmp_path / "save_adapter" / name).read_bytes()
    if case == "ptuning_lstm":
        saved = safetensors.torch.load_file(tmp_path / "adapter" / ENCODER_STATE_NAME)
        state = prompt_encoder(model).state_dict()
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items())
        fastpeft.merge_prefix(model)
        model.save_pretrained(tmp_path / "adapter")
        assert {p.name for p in (tmp_path / "adapter").iterdir()} == PEFT_FILES | {TRAINER_COPY}
        check_trainer_copy(tmp_path / "adapter", model)  # the merged prompts, no encoder
    fastpeft.unload(model)
    model.save_pretrained(tmp_path / "full")
    assert "model.safetensors" in {p.name for p in (tmp_path / "full").iterdir()}


def test_from_peft_prompt_models_checkpoint_their_encoder(tmp_path):
    """A PEFT P-tuning (MLP) model converted by ``fastpeft.from_peft`` trains under Trainer and
    checkpoints PEFT's files plus its MLP, which ``load_adapter_weights`` restores; the PEFT
    wrapper itself is refused, naming the model to pass instead."""
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(build_model("llama"), peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=8))
    model = fastpeft.from_peft(peft_model)
    with pytest.raises(ValueError, match="is a PEFT model .* the model from_peft returned"):
        fastpeft.integrations.enable_adapter_checkpoints(transformers.Trainer(
            model=peft_model, args=training_args(tmp_path), train_dataset=CountingDataset()))
    trainer = trainer_for(model, tmp_path, max_steps=SAVE_STEPS)
    trainer.train()
    checkpoint = tmp_path / f"checkpoint-{SAVE_STEPS}"
    assert {p.name for p in checkpoint.iterdir()} == PEFT_FILES | {ENCODER_STATE_NAME, TRAINER_COPY} | TRAINER_FILES
    other = fastpeft.from_peft(peft.get_peft_model(build_model("llama"), peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=8)))
    fastpeft.integrations.load_adapter_weights(other, checkpoint)
    trained = trainable_state(model)
    assert trained and trainable_state(other).keys() == trained.keys()
    assert all(torch.equal(value, trained[name]) for name, value in trainable_state(other).items())


def test_every_method_has_its_checkpoint_files():
    """``load_adapter_weights`` reads every method of the registry: none is left out."""
    from fastpeft.api.adapters import METHODS
    from fastpeft.integrations.adapter_checkpoint import _CHECKPOINT_FILES

    assert set(_CHECKPOINT_FILES) == {method.name for method in METHODS}
