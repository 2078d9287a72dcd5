"""Checkpoints of a model sharded with FSDP2, on two CPU processes (gloo, 127.0.0.1 only;
``tests/helpers/distributed.py`` spawns the ranks): an adapter saved from one sharded model is
loaded back into another (``load_adapter_weights``, what resuming does; rank 0 reads, shards
are scattered), ``torch.distributed.checkpoint`` (DCP) round-trips the adapter, whole-model
and adapter-only, a failed rank-0 read or write raises on every rank; ``load_adapter`` into an
already sharded model (rank 0 reads) trains as one process; ``inject`` into one is refused.

Each rank builds the LoRA Llama of ``tests/helpers/training.py`` twice with different LoRA
inits (the same on both ranks: one seed), shards both, and moves the first one's adapter into
the second; the parent checks the second ends up holding the first's weights exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn

import fastpeft
from fastpeft.integrations import load_adapter_weights
from tests.helpers.distributed import (
    PER_RANK,
    adamw_steps,
    full,
    outcome,
    rank_process_group,
    shard_adapters_apart,
    shard_decoder_layers,
    spawn_ranks,
)
from tests.helpers.numerics import assert_close
from tests.helpers.training import build_model, lora_config, lora_model, one_thread

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

STEPS = 2

SOURCE_SEED, TARGET_SEED = 7, 8  # the two models' LoRA inits


def _lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA parameters, whole, by name."""
    return {n: full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def _sharded(seed: int, shard=shard_decoder_layers) -> nn.Module:
    """The LoRA Llama with LoRA weights drawn from ``seed``, sharded by ``shard``."""
    model = lora_model("llama")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return shard(model)


def _loaded_into_sharded(model: nn.Module, directory: Path, rank: int) -> dict:
    """``load_adapter`` (trainable) into ``model``, already sharded (rank 0 reads the files),
    then ``STEPS`` AdamW steps on this rank's rows, then ``save_adapter`` to
    ``trained-after-load`` beside ``directory``: the LoRA weights as loaded and at the end,
    whether each is sharded (a DTensor), the first step's gradients."""
    fastpeft.load_adapter(model, directory, is_trainable=True)
    lora = [p for p in model.parameters() if p.requires_grad]
    loaded = {"weights": _lora(model), "sharded": bool(lora) and all(isinstance(p, DTensor) for p in lora)}
    grads = adamw_steps(model.train(), model, slice(rank * PER_RANK, (rank + 1) * PER_RANK), STEPS)
    fastpeft.save_adapter(model, directory.with_name("trained-after-load"))
    return {**loaded, "grads": grads, "final": _lora(model)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    out = Path(out_dir)
    with rank_process_group(rank, port):
        source = _sharded(SOURCE_SEED)
        results = {"source": _lora(source), "target_init": _lora(_sharded(TARGET_SEED))}
        fastpeft.save_adapter(source, out / "adapter")
        for name, shard in (("resumed", shard_decoder_layers), ("resumed_apart", shard_adapters_apart)):
            target = _sharded(TARGET_SEED, shard)
            load_adapter_weights(target, out / "adapter")
            results[name] = _lora(target)

        dcp.save(source.state_dict(), checkpoint_id=out / "dcp-full")
        target = _sharded(TARGET_SEED)
        state = target.state_dict()
        dcp.load(state, checkpoint_id=out / "dcp-full")
        target.load_state_dict(state)
        results["dcp_full"] = _lora(target)

        trainable = {n for n, p in source.named_parameters() if p.requires_grad}
        adapter_only = {k: v for k, v in get_model_state_dict(source).items() if k in trainable}
        dcp.save(adapter_only, checkpoint_id=out / "dcp-adapter")
        target = _sharded(TARGET_SEED)
        state = {k: v for k, v in get_model_state_dict(target).items() if k in trainable}
        dcp.load(state, checkpoint_id=out / "dcp-adapter")
        unexpected = set_model_state_dict(target, state, options=dcp.state_dict.StateDictOptions(strict=False))
        results["dcp_adapter"] = _lora(target)
        results["dcp_adapter_missing"] = sorted(set(unexpected.missing_keys) & trainable)

        results["missing_dir"] = outcome(lambda: load_adapter_weights(target, out / "no-such-adapter"))
        plain = shard_decoder_layers(build_model("llama"))
        parameters = dict(plain.named_parameters())
        results["inject_sharded"] = outcome(lambda: fastpeft.inject(plain, lora_config("llama")))
        after = dict(plain.named_parameters())
        results["sharded_unchanged"] = after.keys() == parameters.keys() and all(
            p is parameters[n] for n, p in after.items())
        results["loaded_into_sharded"] = _loaded_into_sharded(plain, out / "adapter", rank)
        (out / "a-file").write_text("not a directory")
        results["unwritable"] = outcome(lambda: fastpeft.save_adapter(source, out / "a-file"))
        torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoint-ranks")


@pytest.fixture(scope="module")
def rank_results(ranks_dir) -> list[dict]:
    return spawn_ranks(_worker, ranks_dir, "FSDP2 checkpoints")


@pytest.mark.parametrize("loaded", ["resumed", "resumed_apart", "dcp_full", "dcp_adapter"])
def test_the_adapter_moves_between_sharded_models(rank_results, loaded):
    """After the load every rank's second model holds the first one's LoRA weights exactly
    (they started different): ``load_adapter_weights`` into a model sharded per decoder layer
    and one with its LoRA submodules sharded apart, DCP of the whole state dict and of the
    adapter's entries only."""
    for rank, results in enumerate(rank_results):
        source, before, after = results["source"], results["target_init"], results[loaded]
        assert source.keys() == after.keys() and len(source) == 2 * 7 * 2
        for name, value in source.items():
            assert not torch.equal(before[name], value), f"{name}: the models started alike"
            assert torch.equal(after[name], value), f"rank {rank} {loaded}: {name}"
    assert rank_results[0]["dcp_adapter_missing"] == []


def test_inject_into_a_sharded_model_is_refused(rank_results):
    """``inject`` into a model already sharded with FSDP2 (each rank would draw its own
    adapter) is refused with the order that works, the model left as it was."""
    for results in rank_results:
        outcome = results["inject_sharded"]
        assert outcome.startswith("ValueError") and "inject first, then fully_shard" in outcome, outcome
        assert results["sharded_unchanged"]


def test_load_adapter_into_a_sharded_model_trains_as_one_process(rank_results, ranks_dir):
    """``load_adapter`` into a model already sharded with FSDP2: every rank holds the saved
    LoRA weights, sharded; the first step's gradients equal one process's on the whole batch
    (the adapter loaded into an unsharded model); the trained adapter saves whole."""
    saved = {k.removeprefix("base_model.model."): v
             for k, v in safetensors.torch.load_file(ranks_dir / "adapter" / "adapter_model.safetensors").items()}
    with one_thread():
        reference = fastpeft.load_adapter(build_model("llama"), ranks_dir / "adapter", is_trainable=True).train()
        expected = adamw_steps(reference, reference, slice(None), STEPS)
    for rank, results in enumerate(rank_results):
        loaded = results["loaded_into_sharded"]
        assert loaded["sharded"], f"rank {rank}: the loaded LoRA weights are not sharded"
        assert loaded["weights"].keys() == saved.keys()
        assert all(torch.equal(loaded["weights"][k], v) for k, v in saved.items()), f"rank {rank}"
        assert loaded["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            assert grad.abs().sum() > 0, f"{name}: zero gradient"
            assert_close(loaded["grads"][name], grad, torch.float32, f"rank {rank} grad of {name}")
    final = rank_results[0]["loaded_into_sharded"]["final"]
    trained = safetensors.torch.load_file(ranks_dir / "trained-after-load" / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model."): v for k, v in trained.items()}.keys() == final.keys()
    assert all(torch.equal(trained[f"base_model.model.{k}"], v) and not torch.equal(v, saved[k])
               for k, v in final.items())


def test_rank_zero_failures_raise_on_every_rank(rank_results):
    """A checkpoint directory that does not exist, a save into a path that is a file: rank 0's
    own error there, a RuntimeError naming it on the other rank (no rank hangs)."""
    first, second = rank_results
    assert first["missing_dir"].startswith("FileNotFoundError"), first["missing_dir"]
    assert second["missing_dir"].startswith("RuntimeError: rank 0 of the model's process group could not read "
                                            "the adapter checkpoint: FileNotFoundError"), second["missing_dir"]
    assert first["unwritable"].startswith("NotADirectoryError"), first["unwritable"]
    assert second["unwritable"].startswith("RuntimeError: rank 0 of the model's process group could not write "
                                           "the adapter: NotADirectoryError"), second["unwritable"]
