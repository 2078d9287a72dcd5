"""Saves are all or nothing for every adapter kind, and every fastpeft reader reads one save.

* ``kill -9`` at random moments of a writer saving two adapters in turn whose configs
  differ (bottleneck, prompt tuning, prefix tuning with its MLP's extra file, LoRA through
  ``save_pretrained`` with its Trainer copy, ``model.safetensors``, and LoRA alternating such a
  save with ``save_adapter``, which removes the copy): afterwards
  the directory loads, and holds exactly one save's files (config and every tensor file,
  byte for byte); files that are not the adapter's are untouched;
* a kill before each file-system call of a save, one by one (every step of the commit);
* readers (``load_adapter`` for LoRA / AdapterHub / prompt directories,
  ``MultiAdapterModel.load_adapter``, ``load_adapter_weights``) looping against a writer
  process: each read returns one save's adapter, never a mix, and never fails because a
  save is in progress.

Writers are forked from a zygote (``tests.helpers.zygote``) that builds the models once.
tests/formats/test_safe_write.py has the LoRA kill test and the directory cases (mounts,
permissions, concurrent writers).
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.api import adapter_state_dict
from fastpeft.formats.file_names import SAVED_FILE_NAMES
from fastpeft.formats.save_journal import JOURNAL_NAME
from fastpeft.integrations import load_adapter_weights
from fastpeft.serving import MultiAdapterModel
from tests.helpers.models import tiny_llama
from tests.helpers.zygote import Zygote

# kind -> its two variants' configs; every pair differs in its config, so a mix of one
# save's config and the other's weights cannot load as either. "prefix_same" keeps the
# config (load_adapter_weights needs the model's own config) and changes the weights only.
KINDS = {
    "lora": [fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             fastpeft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"])],
    "bottleneck": [fastpeft.AdapterConfig("seq_bn", reduction_factor=16),
                   fastpeft.AdapterConfig("seq_bn", reduction_factor=8)],
    "prompt": [fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
               fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)],
    "prefix_mlp": [fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                               encoder_hidden_size=24),
                   fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                               encoder_hidden_size=24)],
}
KINDS["prefix_same"] = [KINDS["prefix_mlp"][0], KINDS["prefix_mlp"][0]]
# Kinds saved by the model's save_pretrained: the adapter and its Trainer copy in one commit;
# "lora_copy_removed": variant 0 so, variant 1 by save_adapter (which removes the copy in its commit).
KINDS["lora_pretrained"] = KINDS["lora"]
KINDS["lora_copy_removed"] = KINDS["lora"]
PRETRAINED_KINDS = {"lora_pretrained"}

# Kills per kind: at least MIN_KILLS, more (up to MAX_KILLS) until MIN_MID_SAVE of them
# landed mid-save (temp files or a journal left) and both variants were seen.
MIN_KILLS = 40
MAX_KILLS = 120
MIN_MID_SAVE = 8
# Wait from fork to kill: a forked writer starts at once, and one save of these tiny
# adapters takes 2-10 ms here, so kills land in the first few saves, at random points. On a
# loaded machine the writer may not finish (or start) a save in that window: every
# KILL_WINDOW_STEP kills that have not yet landed both mid-save and after a whole save, the
# window doubles, up to KILL_DELAY_MAX_S (seen on a 2-core VM running 8 processes: 120
# kills in 30 ms windows all before the first save ended).
KILL_DELAY_S = (0.0, 0.03)
KILL_WINDOW_STEP = 10
KILL_DELAY_MAX_S = 2.0
# Writer saves while a reader loops: enough for ~100 reads of each reader.
READER_SAVES = 150


@functools.cache
def variant_model(kind: str, index: int) -> nn.Module:
    """A tiny Llama with the kind's variant ``index``, its adapter's weights random (seeded):
    cached, never modified."""
    model = fastpeft.inject(tiny_llama(0), KINDS[kind][index])
    generator = torch.Generator().manual_seed(100 * index + len(kind))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def save(kind: str, index: int, directory: str | Path) -> None:
    """Save the kind's variant ``index`` to ``directory`` as the kind is saved."""
    model = variant_model(kind, index)
    if kind in PRETRAINED_KINDS or (kind == "lora_copy_removed" and index == 0):
        model.save_pretrained(directory)
    else:
        fastpeft.save_adapter(model, directory)


@functools.cache
def reference_files(kind: str, index: int) -> dict[str, bytes]:
    """Every adapter file a save of the variant writes, name -> bytes."""
    with tempfile.TemporaryDirectory() as directory:
        save(kind, index, directory)
        return adapter_files(Path(directory))


def adapter_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in os.listdir(directory) if name in SAVED_FILE_NAMES}


def same_tensors(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def zygote_warm() -> None:
    for kind in KINDS:
        for index in (0, 1):
            reference_files(kind, index)


@pytest.fixture(scope="module")
def zygote():
    server = Zygote("tests.formats.test_save_atomicity")
    yield server
    server.close()


def loaded_variant(kind: str, directory: Path, *, writer_running: bool = False) -> int:
    """Which variant ``fastpeft.load_adapter`` loads from ``directory``. With no writer
    running, the files on disk must then be exactly that variant's (the load completed a
    killed save) and no journal is left."""
    loaded = adapter_state_dict(fastpeft.load_adapter(tiny_llama(0), directory))
    matches = [i for i in (0, 1) if same_tensors(loaded, adapter_state_dict(variant_model(kind, i)))]
    assert len(matches) == 1, f"{directory} loads as {matches or 'neither'} of {kind}'s variants"
    if writer_running:
        return matches[0]
    assert adapter_files(directory) == reference_files(kind, matches[0]), "the files are not all of one save"
    assert JOURNAL_NAME not in os.listdir(directory)
    return matches[0]


def _child_save_forever(kind: str, directory: str) -> None:
    for i in itertools.count():
        save(kind, (i + 1) % 2, directory)


def _child_save(kind: str, directory: str, times: int) -> None:
    for i in range(times):
        save(kind, (i + 1) % 2, directory)


def _with_keep_files(directory: Path) -> dict[str, bytes]:
    """Files that are not the adapter's, planted in ``directory``; returns their contents."""
    (directory / "notes.txt").write_text("keep")
    (directory / "trainer_state.json").write_text("{}")
    return {name: (directory / name).read_bytes() for name in ("notes.txt", "trainer_state.json")}


@pytest.mark.parametrize("kind", ["bottleneck", "prompt", "prefix_mlp", "lora_pretrained", "lora_copy_removed"])
def test_sigkill_at_random_moments_leaves_one_whole_save(zygote, tmp_path, kind):
    target = tmp_path / "adapter"
    save(kind, 0, target)
    keep = _with_keep_files(target)
    rng = random.Random(kind)
    seen: Counter[int] = Counter()
    mid_save = 0
    low, high = KILL_DELAY_S
    for kills in range(1, MAX_KILLS + 1):
        pid = zygote.fork("_child_save_forever", kind=kind, directory=str(target))
        time.sleep(rng.uniform(low, high))
        os.kill(pid, signal.SIGKILL)
        code, outcome = zygote.wait(pid)
        assert code == -signal.SIGKILL, outcome
        mid_save += any(".tmp-" in name or name == JOURNAL_NAME for name in os.listdir(target))
        seen[loaded_variant(kind, target)] += 1
        assert {name: (target / name).read_bytes() for name in keep} == keep
        if kills >= MIN_KILLS and mid_save >= MIN_MID_SAVE and len(seen) == 2:
            break
        if kills % KILL_WINDOW_STEP == 0 and (mid_save < MIN_MID_SAVE or len(seen) < 2):
            high = min(2 * high, KILL_DELAY_MAX_S)
    assert mid_save >= MIN_MID_SAVE, f"only {mid_save} of {kills} kills landed mid-save"
    assert len(seen) == 2, seen
    save(kind, 0, target)  # removes the killed writers' temp files
    assert sorted(os.listdir(target)) == sorted([*reference_files(kind, 0), *keep])


# --- a kill before each file-system call of one save ----------------------------------------

# The calls a save changes the directory (or makes it durable) with.
_CALLS = ("open", "fsync", "replace", "unlink")


def _child_save_killed_at(kind: str, directory: str, index: int, step: int | None) -> int:
    """Save variant ``index``, dying (as kill -9 would: no cleanup) just before the
    ``step``-th call of ``_CALLS``; with ``step`` None, count the calls a save makes."""
    calls = itertools.count()
    for name in _CALLS:
        original = getattr(os, name)

        def counted(*args, _original=original, **kwargs):
            if next(calls) == step:
                os._exit(9)
            return _original(*args, **kwargs)

        setattr(os, name, counted)
    save(kind, index, directory)
    return next(calls)


@pytest.mark.parametrize("kind", ["lora", "prefix_mlp", "lora_pretrained", "lora_copy_removed"])
def test_a_kill_before_every_step_of_a_save_leaves_one_whole_save(zygote, tmp_path, kind):
    """Variant 1 saved over variant 0, killed before its first, second, ... call: each
    time the directory loads as variant 0 until the commit point and as variant 1 after it."""
    target = tmp_path / "adapter"
    steps = zygote.run("_child_save_killed_at", kind=kind, directory=str(tmp_path / "count"), index=1, step=None)
    assert steps >= 10, steps  # stage x3, journal, renames, syncs
    outcomes = []
    for step in range(steps):
        save(kind, 0, target)
        keep = _with_keep_files(target)
        code, _ = zygote.wait(zygote.fork("_child_save_killed_at", kind=kind, directory=str(target), index=1,
                                          step=step))
        assert code == 9
        outcomes.append(loaded_variant(kind, target))
        assert {name: (target / name).read_bytes() for name in keep} == keep
    # the old adapter up to the commit point, the new one from it on: one switch
    assert outcomes == sorted(outcomes) and outcomes[0] == 0 and outcomes[-1] == 1, outcomes


# --- readers against a writer ----------------------------------------------------------------


def _read_while_writing(zygote, kind: str, target: Path, read) -> Counter:
    """Call ``read()`` (which returns the variant it read) in a loop while a writer process
    saves the kind's two variants in turn; every call must succeed."""
    save(kind, 0, target)
    pid = zygote.fork("_child_save", kind=kind, directory=str(target), times=READER_SAVES)
    done, result = threading.Event(), []
    threading.Thread(target=lambda: (result.append(zygote.wait(pid)), done.set()), daemon=True).start()
    seen: Counter = Counter()
    try:
        while not done.is_set():
            seen[read()] += 1
    finally:
        done.wait(120)  # reap the writer before a failure ends the test
    assert result == [(0, {"value": None})]
    assert seen.total() >= 10 and len(seen) == 2, seen
    return seen


@pytest.mark.parametrize("kind", ["lora", "bottleneck", "prompt"])
def test_load_adapter_during_saves_reads_one_save(zygote, tmp_path, kind):
    _read_while_writing(zygote, kind, tmp_path, lambda: loaded_variant(kind, tmp_path, writer_running=True))


def test_multi_adapter_load_during_saves_reads_one_save(zygote, tmp_path):
    model = MultiAdapterModel(tiny_llama(0), max_adapters=2, max_rank=8, target_modules=["q_proj", "v_proj"])
    variants = [adapter_state_dict(variant_model("lora", i)) for i in (0, 1)]
    prefix = "base_model.model."

    def read() -> int:
        slot = model.load_adapter("x", tmp_path)
        try:
            matches = []
            for i, state in enumerate(variants):
                r = KINDS["lora"][i].r
                if all(torch.equal(model.layers[key.removeprefix(prefix).rsplit(".lora_", 1)[0]].lora_A[slot, :r], a)
                       for key, a in state.items() if key.endswith("lora_A.weight")):
                    matches.append(i)
            assert len(matches) == 1, matches
            return matches[0]
        finally:
            model.unload_adapter("x")

    _read_while_writing(zygote, "lora", tmp_path, read)


def test_load_adapter_weights_during_saves_reads_one_save(zygote, tmp_path):
    """A resumed prefix-MLP model: its MLP comes from the encoder file, the rest from PEFT's
    file; both must be of one save."""
    model = copy.deepcopy(variant_model("prefix_same", 0))
    references = [{k: v.clone() for k, v in variant_model("prefix_same", i).state_dict().items()
                   if "prompt_encoder" in k} for i in (0, 1)]

    def read() -> int:
        load_adapter_weights(model, tmp_path)
        state = {k: v for k, v in model.state_dict().items() if "prompt_encoder" in k}
        matches = [i for i, reference in enumerate(references) if same_tensors(state, reference)]
        assert len(matches) == 1, matches
        return matches[0]

    _read_while_writing(zygote, "prefix_same", tmp_path, read)
