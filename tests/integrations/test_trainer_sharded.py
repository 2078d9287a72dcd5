"""HF Trainer with a fastpeft model under distributed training, on two CPU processes (gloo,
127.0.0.1 only; ``tests/helpers/distributed.py`` spawns the ranks): DDP and FSDP2 through
accelerate (state dicts ``FULL_STATE_DICT``, Trainer's default, and ``SHARDED_STATE_DICT``) and
DeepSpeed ZeRO-2 / ZeRO-3 (``DS_ACCELERATOR=cpu``). DDP, FSDP2 with sharded state dicts and
the DeepSpeed "-line" runs call ``enable_adapter_checkpoints``; the others (DDP too, as
"ddp-plain": Trainer resumes from the Trainer copy, ``model.safetensors``) show what works
without it.

Every run trains ``STEPS`` steps with a checkpoint every ``SAVE_STEPS``, then a second run
resumes from the first checkpoint. Checked: each checkpoint holds a PEFT-format adapter that
PEFT itself loads; the adapter trained as one process trains on the same data; resuming
reproduces the uninterrupted run's adapter exactly; ``load_best_model_at_end`` leaves the best
checkpoint's adapter in the model; DeepSpeed ZeRO-3 without gathered 16-bit weights is a
clear error before training (``enable_adapter_checkpoints``) or at the first checkpoint.

What the CPU forces on these runs, and how each was handled:

* accelerate enables FSDP only on accelerator devices (its CPU distributed type has no FSDP
  branch): ``_allow_fsdp_on_cpu`` sets the distributed type to FSDP when accelerate was given
  an FSDP plugin, as it does on a GPU; the rest (``fully_shard`` over the decoder layers,
  state dicts, DCP checkpoints) is accelerate's and Trainer's own code;
* under DeepSpeed without an accelerator accelerate counts one process while DeepSpeed runs
  two: each rank gets the whole batch (so the reference is one process on it), and
  evaluation's gather fails in accelerate, so ``load_best_model_at_end`` under DeepSpeed runs
  in one process.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft.api.adapters import adapter_state_dict
from tests.helpers.distributed import WORLD, outcome, spawn_ranks
from tests.helpers.numerics import TOLERANCE, relative_error
from tests.helpers.trainer import SAVE_STEPS, STEPS, CountingDataset, training_args
from tests.helpers.training import build_model, lora_model, one_thread

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

PER_DEVICE = 2  # sequences per rank and step
# stack -> Trainer settings, whether enable_adapter_checkpoints is called, whether each rank
# trains on a share of each global batch (FSDP2) or on all of it (DeepSpeed, see above)
STACKS = {
    "ddp": ({}, True, True),
    "ddp-plain": ({}, False, True),
    "fsdp2-full": (dict(fsdp="full_shard auto_wrap", fsdp_config={
        "version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": "FULL_STATE_DICT"}),
        False, True),
    "fsdp2-sharded": (dict(fsdp="full_shard auto_wrap", fsdp_config={
        "version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": "SHARDED_STATE_DICT"}),
        True, True),
}
ZERO2 = dict(use_cpu=False, deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": PER_DEVICE,
                                       "gradient_accumulation_steps": 1})
ZERO3 = dict(use_cpu=False, deepspeed={
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": PER_DEVICE, "gradient_accumulation_steps": 1})
# without the line, and with it (the engine's checkpoints then leave the frozen base out)
STACKS.update({"zero2": (ZERO2, False, False), "zero2-line": (ZERO2, True, False),
               "zero3": (ZERO3, False, False), "zero3-line": (ZERO3, True, False)})
ACCELERATE_STACKS = ("ddp", "ddp-plain", "fsdp2-full", "fsdp2-sharded")
DEEPSPEED_STACKS = ("zero2", "zero2-line", "zero3", "zero3-line")
DEEPSPEED_BEST_STACKS = ("zero2-line", "zero3")  # run in one process (see the module docstring)
ZERO3_UNGATHERED = dict(use_cpu=False, deepspeed={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu":
                                                  PER_DEVICE, "gradient_accumulation_steps": 1})
ADAPTER = "adapter_model.safetensors"


def _allow_fsdp_on_cpu() -> None:
    """accelerate's FSDP on the CPU: where accelerate was given an FSDP plugin but found no
    accelerator, make its state say FSDP, as it would on a GPU (its own code does the rest)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.fsdp_plugin = fsdp_plugin
        if self.__dict__.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def _trainer(stack_settings: dict, line: bool, out: Path, **overrides) -> transformers.Trainer:
    args = training_args(out, per_device_train_batch_size=PER_DEVICE, ddp_backend="gloo",
                         **{**stack_settings, **overrides})
    trainer = transformers.Trainer(model=lora_model("llama"), args=args, train_dataset=CountingDataset(),
                                   eval_dataset=CountingDataset(size=4, seed=1))
    return fastpeft.integrations.enable_adapter_checkpoints(trainer) if line else trainer


def _best_run(stack: str, out: Path) -> str:
    """A run with ``load_best_model_at_end`` whose best checkpoint is the first one (the metric
    is the evaluation loss, made "greater is better"), then ``save_model`` of the model it ends
    with into ``<stack>-best/final``; the best checkpoint's path."""
    settings, line, _ = STACKS[stack]
    trainer = _trainer(settings, line, out / f"{stack}-best", load_best_model_at_end=True, eval_strategy="steps",
                       eval_steps=SAVE_STEPS, metric_for_best_model="loss", greater_is_better=True)
    trainer.train()
    trainer.save_model(str(out / f"{stack}-best" / "final"))
    return trainer.state.best_model_checkpoint


def _leave_process_group() -> None:
    """Destroy the process group accelerate / DeepSpeed made, every rank together, before the
    interpreter exits: left to the exit, gloo's threads can be torn down while running
    (``terminate called without an active exception``: the rank dies of SIGABRT after
    saving its results, seen on a loaded 2-core CI machine)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _deepspeed_best_worker(rank: int, port: int, out_dir: str) -> None:
    """The one rank of DeepSpeed runs keeping the best model (with two, accelerate on a CPU
    counts one process and evaluation fails): ZeRO-2 with the line, ZeRO-3 without."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    results = {}
    for stack in DEEPSPEED_BEST_STACKS:
        accelerate.state.AcceleratorState._reset_state()
        results[f"{stack}-best"] = _best_run(stack, Path(out_dir))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    _leave_process_group()


def _worker(stacks: tuple[str, ...], rank: int, port: int, out_dir: str) -> None:
    """One rank: for each stack a run, a resumed run (and under FSDP2 a run keeping the best
    model, whose adapter it saves); under DeepSpeed also the ZeRO-3 refusals."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    _allow_fsdp_on_cpu()
    out, results = Path(out_dir), {}
    for stack in stacks:
        accelerate.state.AcceleratorState._reset_state()  # each stack's plugins from scratch (the process group stays)
        settings, line, _ = STACKS[stack]
        _trainer(settings, line, out / stack).train()
        _trainer(settings, line, out / f"{stack}-resumed").train(
            resume_from_checkpoint=str(out / stack / f"checkpoint-{SAVE_STEPS}"))
        if stack in ACCELERATE_STACKS:
            results[f"{stack}-best"] = _best_run(stack, out)
    if stacks == DEEPSPEED_STACKS:
        results["early"] = outcome(lambda: _trainer(ZERO3_UNGATHERED, True, out / "zero3-early"))
        results["first_checkpoint"] = outcome(lambda: _trainer(ZERO3_UNGATHERED, False, out / "zero3-late").train())
    torch.save(results, out / f"rank{rank}.pt")
    _leave_process_group()


def _spawned(tmp_path_factory, stacks: tuple[str, ...]) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("trainer-" + stacks[0])
    return out, spawn_ranks(functools.partial(_worker, stacks), out, f"Trainer under {', '.join(stacks)}")


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory):
    return _spawned(tmp_path_factory, ACCELERATE_STACKS)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    return _spawned(tmp_path_factory, DEEPSPEED_STACKS)


@pytest.fixture(scope="module")
def deepspeed_best_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer-deepspeed-best")
    return out, spawn_ranks(_deepspeed_best_worker, out, "Trainer keeping the best model under DeepSpeed", ranks=1)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[bool, dict[str, torch.Tensor]]:
    """The reference adapters at the end: one process training on the global batches (ranks
    sharing each batch) or on each rank's batches (ranks each given all of it)."""
    references = {}
    with one_thread():
        for shares in (True, False):
            out = tmp_path_factory.mktemp("one-process")
            batch = PER_DEVICE * (WORLD if shares else 1)
            transformers.Trainer(model=lora_model("llama"), train_dataset=CountingDataset(),
                                 args=training_args(out, per_device_train_batch_size=batch)).train()
            references[shares] = safetensors.torch.load_file(out / f"checkpoint-{STEPS}" / ADAPTER)
    return references


def _runs(stack: str, accelerate_runs, deepspeed_runs) -> Path:
    return (accelerate_runs if stack in ACCELERATE_STACKS else deepspeed_runs)[0]


@pytest.mark.parametrize("stack", STACKS)
def test_checkpoints_hold_the_trained_adapter_in_peft_format(stack, accelerate_runs, deepspeed_runs, one_process):
    """Every checkpoint holds PEFT's two files, which ``peft.PeftModel.from_pretrained`` loads
    (its LoRA weights are the file's); the last one's adapter is the one a single process
    trains on the same data (10x fp32 tolerance: Adam divides by sqrt(v))."""
    out = _runs(stack, accelerate_runs, deepspeed_runs) / stack
    for step in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS):
        checkpoint = out / f"checkpoint-{step}"
        assert {"adapter_config.json", ADAPTER} <= {p.name for p in checkpoint.iterdir()}
        saved = safetensors.torch.load_file(checkpoint / ADAPTER)
        loaded = peft.PeftModel.from_pretrained(build_model("llama"), checkpoint)
        params = dict(loaded.named_parameters())
        assert len(saved) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
        for key, value in saved.items():
            assert torch.equal(params[key.replace(".weight", ".default.weight")], value), key
    expected = one_process[STACKS[stack][2]]
    init = adapter_state_dict(lora_model("llama"))
    for key, value in safetensors.torch.load_file(out / f"checkpoint-{STEPS}" / ADAPTER).items():
        update, want = value - init[key], expected[key] - init[key]
        assert update.abs().sum() > 0, f"{stack}: {key} did not train"
        err = relative_error(update, want)
        assert err <= 10 * TOLERANCE[torch.float32], f"{stack}: update of {key}: relative error {err:.2e}"


@pytest.mark.parametrize("stack", STACKS)
def test_resuming_reproduces_the_run(stack, accelerate_runs, deepspeed_runs):
    """The run resumed from the first checkpoint ends with the uninterrupted run's adapter,
    bit for bit."""
    out = _runs(stack, accelerate_runs, deepspeed_runs)
    uninterrupted = safetensors.torch.load_file(out / stack / f"checkpoint-{STEPS}" / ADAPTER)
    resumed = safetensors.torch.load_file(out / f"{stack}-resumed" / f"checkpoint-{STEPS}" / ADAPTER)
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())


@pytest.mark.parametrize("stack", [*ACCELERATE_STACKS, *DEEPSPEED_BEST_STACKS])
def test_load_best_model_at_end(stack, accelerate_runs, deepspeed_best_runs):
    """``load_best_model_at_end`` with the first checkpoint the best: the model the run ends
    with (saved by ``save_model``) holds that checkpoint's adapter, not the last one's."""
    out, results = accelerate_runs if stack in ACCELERATE_STACKS else deepspeed_best_runs
    run = out / f"{stack}-best"
    assert all(result[f"{stack}-best"] == str(run / f"checkpoint-{SAVE_STEPS}") for result in results)
    best, last, final = (safetensors.torch.load_file(run / name / ADAPTER)
                         for name in (f"checkpoint-{SAVE_STEPS}", f"checkpoint-{STEPS}", "final"))
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], v) for k, v in best.items())
    assert not all(torch.equal(final[k], v) for k, v in last.items())


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_checkpoints_leave_the_frozen_base_out_with_the_line(stage, deepspeed_runs):
    """With ``enable_adapter_checkpoints`` DeepSpeed's own checkpoint files (``global_step*``)
    leave the frozen base out: less than a third of the bytes of the same run's without it."""
    out = deepspeed_runs[0]

    def engine_bytes(stack: str) -> int:
        return sum(p.stat().st_size for p in (out / stack / f"checkpoint-{SAVE_STEPS}").glob("global_step*/*model*"))

    assert 0 < 3 * engine_bytes(f"{stage}-line") < engine_bytes(stage)


def test_zero3_without_gathered_weights_fails_clearly(deepspeed_runs):
    """ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``: ``enable_adapter_checkpoints``
    refuses it before training; without it the first checkpoint raises, naming the option
    (rank 0 writes; the other rank's save does nothing and it fails on the lost peer)."""
    first = deepspeed_runs[1][0]
    for reported in (first["early"], first["first_checkpoint"]):
        assert reported.startswith("ValueError") and "stage3_gather_16bit_weights_on_model_save" in reported, reported
    assert deepspeed_runs[1][1]["early"].startswith("ValueError")
