"""fastpeft models trained through HF accelerate: ``accelerator.prepare(model, optimizer)``
and ``accelerator.backward``, on the CPU.

* one process, ``mixed_precision="bf16"`` (CPU autocast around the model's forward): the
  fastpeft model trains with the losses of the same PEFT model and LoRA gradients as
  accurate as PEFT's; ``mixed_precision="no"`` reproduces a plain training loop exactly;
  the README's adapter save / reload lines work on a prepared model (LoRA, and a bottleneck
  adapter and a prefix MLP, each in its native files);
* DDP through accelerate: two processes (gloo on 127.0.0.1, spawned and bounded in time by
  ``tests/helpers/distributed.py``, as in ``tests/integrations/test_distributed.py``) each take half of every
  batch; their first-step LoRA gradients equal one process's on the whole batch, in fp32
  and in bf16, and the ranks stay in sync.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastpeft
from tests.helpers.adapter_cases import CASES, adapted
from tests.helpers.distributed import BATCH_SEED, COLLECTIVE_TIMEOUT_S, PER_RANK, WORLD, spawn_ranks
from tests.helpers.numerics import TOLERANCE, assert_close, relative_error
from tests.helpers.trainer import TRAINER_COPY
from tests.helpers.training import build_model, lora_config, lora_grads, lora_model, one_thread, shift_batch

accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

STEPS = 3
LENGTH = 8
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread; accelerate's process-wide state cleared after the test."""
    with one_thread():
        yield
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def fresh_accelerator(*, keep_process_group: bool = False, **kwargs) -> accelerate.Accelerator:
    """An ``Accelerator(cpu=True, **kwargs)`` on cleared process-wide state: accelerate keeps
    one ``AcceleratorState`` per process, whose mixed precision cannot change once set (a
    Trainer test in the same process sets it too). ``keep_process_group`` keeps the
    distributed state of a rank."""
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=not keep_process_group)
    return accelerate.Accelerator(cpu=True, **kwargs)


def _accelerated_steps(accelerator: accelerate.Accelerator, model: nn.Module, rows: slice) -> dict:
    """``accelerator.prepare`` ``model`` and its AdamW, take ``STEPS`` steps with
    ``accelerator.backward`` on the ``rows`` of each fresh full batch (``WORLD * PER_RANK``
    counting sequences from ``BATCH_SEED``).

    Returns ``losses``, ``grads`` (LoRA gradients of the first step), ``init`` and ``final``
    (trainable parameters), ``base`` (frozen weights before) and ``wrapper`` (the prepared
    model's type name).
    """
    model.train()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    losses = []
    for step in range(STEPS):
        ids = shift_batch(generator, batch=WORLD * PER_RANK, length=LENGTH)[rows]
        loss = prepared(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if step == 0:
            grads = lora_grads(model)
        optimizer.step()
        losses.append(loss.item())
    params = dict(model.named_parameters())
    return {
        "losses": torch.tensor(losses, dtype=torch.float64),
        "grads": grads,
        "init": init,
        "final": {n: params[n].detach().clone() for n in init},
        "base": {n: torch.equal(params[n], value) for n, value in base.items()},
        "wrapper": type(prepared).__name__,
    }


def _twins() -> tuple[nn.Module, nn.Module]:
    """``(fastpeft model, PEFT model)``: the Llama with the same LoRA init in both, ``lora_B``
    drawn from N(0, 0.1) so that ``lora_A`` gets gradients from the first step."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build_model("llama"), lora_config("llama", library=peft))
    for name, param in theirs.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return fastpeft.from_peft(copy.deepcopy(theirs)), theirs


def _peft_names(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's parameter names (``base_model.model.<path>.lora_A.default.weight``) as fastpeft's."""
    return {
        name.removeprefix("base_model.model.").replace(".default.", "."): value for name, value in grads.items()
    }


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].flatten() for name in sorted(grads)])


def test_prepare_bf16_trains_like_peft():
    """Under ``mixed_precision="bf16"`` the fastpeft model's losses match the PEFT model's
    and its first-step LoRA gradients are no further from the fp32 gradients than PEFT's
    by more than 2x (the criterion of ``tests/ops/test_autocast.py``: both round to bf16, in a
    different order); the loss falls, the LoRA weights stay fp32 and the base weights do
    not move."""
    ours, theirs = _twins()
    exact = copy.deepcopy(ours).train()
    ids = shift_batch(torch.Generator().manual_seed(BATCH_SEED), batch=WORLD * PER_RANK, length=LENGTH)
    exact(input_ids=ids, labels=ids).loss.backward()
    exact_grads = _flat(lora_grads(exact))
    accelerator = fresh_accelerator(mixed_precision="bf16")
    mine, peft_run = (_accelerated_steps(accelerator, model, slice(None)) for model in (ours, theirs))
    assert relative_error(mine["losses"], peft_run["losses"]) <= TOLERANCE[torch.bfloat16]
    assert mine["losses"][-1] < mine["losses"][0]
    peft_grads = _peft_names(peft_run["grads"])
    assert mine["grads"].keys() == peft_grads.keys()
    assert all(grad.dtype == torch.float32 for grad in mine["grads"].values())
    # bf16 through the whole network puts both ~2.5% from the fp32 gradients here.
    our_grads, peft_grads = _flat(mine["grads"]), _flat(peft_grads)
    assert relative_error(our_grads, exact_grads) <= 2 * relative_error(peft_grads, exact_grads)
    assert all(p.dtype == torch.float32 for p in mine["final"].values())
    assert all(mine["base"].values())


def test_prepare_fp32_is_a_plain_training_loop():
    """``mixed_precision="no"`` on one process changes nothing: the losses and updates of
    the same loop without accelerate, bit for bit."""
    accelerator = fresh_accelerator()
    prepared = _accelerated_steps(accelerator, lora_model("llama"), slice(None))
    assert prepared["wrapper"] == "LlamaForCausalLM"
    model = lora_model("llama").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    for step in range(STEPS):
        ids = shift_batch(generator, batch=WORLD * PER_RANK, length=LENGTH)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert loss.item() == prepared["losses"][step].item()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, prepared["final"][name]), name


def test_save_and_reload_the_adapter_as_the_readme_says(tmp_path):
    """The README's accelerate save / reload lines: the unwrapped model's ``save_pretrained``
    writes the adapter, which ``load_adapter_weights`` copies into another prepared model."""
    accelerator = fresh_accelerator()
    model = lora_model("llama")
    _accelerated_steps(accelerator, model, slice(None))
    accelerator.unwrap_model(model).save_pretrained(tmp_path, is_main_process=accelerator.is_main_process)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", TRAINER_COPY}
    other = accelerator.prepare(fastpeft.inject(build_model("llama"), lora_config("llama")))
    fastpeft.integrations.load_adapter_weights(accelerator.unwrap_model(other), tmp_path)
    trained = dict(model.named_parameters())
    for name, param in other.named_parameters():
        assert torch.equal(param, trained[name]), name


@pytest.mark.parametrize("case", ["seq_bn", "prefix_mlp"])
def test_save_and_reload_other_adapter_types(case, tmp_path):
    """The same lines for a bottleneck adapter (AdapterHub's files) and a prefix MLP (PEFT's
    files plus its encoder's state): trained under bf16 autocast, saved from the unwrapped
    model, copied into another prepared model's existing parameters."""
    accelerator = fresh_accelerator(mixed_precision="bf16")
    model = adapted(case)
    run = _accelerated_steps(accelerator, model, slice(None))
    assert all(run["base"].values())
    assert all(not torch.equal(value, run["init"][name]) for name, value in run["final"].items())
    accelerator.unwrap_model(model).save_pretrained(tmp_path, is_main_process=accelerator.is_main_process)
    assert {p.name for p in tmp_path.iterdir()} == CASES[case][2] | {TRAINER_COPY}
    other = accelerator.prepare(adapted(case, seed=1))
    params = dict(other.named_parameters())
    fastpeft.integrations.load_adapter_weights(accelerator.unwrap_model(other), tmp_path)
    for name, value in run["final"].items():
        assert torch.equal(params[name], value), name
    assert all(param is params[name] for name, param in other.named_parameters())


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank of an ``accelerate`` DDP run per mixed precision: set the environment
    ``accelerate launch`` would, train, save the results to ``out_dir/rank{rank}.pt``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    group = accelerate.utils.InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for precision in PRECISIONS:
        accelerator = fresh_accelerator(keep_process_group=True, mixed_precision=precision, kwargs_handlers=[group])
        assert accelerator.num_processes == WORLD and accelerator.process_index == rank
        results[precision] = _accelerated_steps(accelerator, lora_model("llama"), rows)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """The results of ``WORLD`` ranks running ``_worker``."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("accelerate_ranks"), "accelerate")


def test_ddp_through_accelerate_matches_one_process(rank_results):
    """accelerate wraps the model in DDP; in fp32 and in bf16 every rank's first-step LoRA
    gradients (DDP's average over the ranks' half batches) equal one process's on the whole
    batch; after ``STEPS`` AdamW steps both ranks hold identical LoRA weights, changed from
    their init, and the frozen weights have not moved; the bf16 runs ran under autocast
    (their losses differ from the fp32 runs' by bf16 rounding). One test, so that pytest-xdist
    spawns the ranks once."""
    for precision, dtype in PRECISIONS.items():
        expected = _accelerated_steps(fresh_accelerator(mixed_precision=precision), lora_model("llama"),
                                      slice(None))["grads"]
        assert len(expected) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
        for rank, results in enumerate(rank_results):
            run = results[precision]
            assert run["wrapper"] == "DistributedDataParallel"
            assert run["grads"].keys() == expected.keys()
            for name, grad in expected.items():
                assert grad.abs().sum() > 0, f"{name}: zero gradient"
                assert_close(run["grads"][name], grad, dtype, f"rank {rank} {precision} grad of {name}")
            assert all(run["base"].values()), f"rank {rank} {precision}: a frozen weight moved"
        first, second = (results[precision] for results in rank_results)
        for name, value in first["final"].items():
            assert torch.equal(value, second["final"][name]), f"{precision}: {name} differs between ranks"
            assert not torch.equal(value, first["init"][name]), f"{precision}: {name} did not train"
    for results in rank_results:
        fp32, bf16 = results["no"]["losses"], results["bf16"]["losses"]
        assert not torch.equal(fp32, bf16)
        assert relative_error(bf16, fp32) <= TOLERANCE[torch.bfloat16]
