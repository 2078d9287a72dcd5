"""The Trainer copy (``fastpeft.formats.trainer_copy``): ``model.safetensors`` beside the
adapter, written by an adapted transformers model's ``save_pretrained`` only where it cannot
be taken for a model's weights, never stale, never read by fastpeft's loaders, and told
apart from any other file of that name without reading a large one or blocking on a FIFO.

(``tests/integrations/test_transformers_trainer*.py`` resume from it with a plain Trainer;
``tests/formats/test_save_atomicity.py`` kills saves that write it.)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft.formats import trainer_copy
from fastpeft.formats.file_names import SAVED_FILE_NAMES
from fastpeft.formats.snapshot import open_snapshot
from fastpeft.integrations.adapter_checkpoint import is_adapter_checkpoint
from tests.helpers.models import tiny_llama
from tests.helpers.trainer import TRAINER_COPY, check_trainer_copy

transformers = pytest.importorskip("transformers")

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def adapted(seed: int) -> torch.nn.Module:
    """A tiny Llama with LoRA weights drawn from ``seed`` (B nonzero)."""
    model = fastpeft.inject(tiny_llama(0), fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                               init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def is_copy(directory: Path) -> bool:
    with open_snapshot(directory, SAVED_FILE_NAMES) as snapshot:
        return trainer_copy.is_copy(snapshot)


def test_save_pretrained_writes_the_copy_and_save_adapter_removes_it(tmp_path):
    """``save_pretrained`` adds the copy (the adapter under the model's keys, marked; byte for
    byte the same for the same adapter), a later one replaces it with the new adapter's, and ``save_adapter`` (PEFT's files only) removes
    it in its commit, so no copy is ever older than the adapter beside it."""
    first, second = adapted(1), adapted(2)
    target = tmp_path / "adapter"
    first.save_pretrained(target)
    assert names(target) == ADAPTER_FILES | {TRAINER_COPY} and is_copy(target)
    check_trainer_copy(target, first)
    first.save_pretrained(tmp_path / "again")  # the same adapter, the same bytes
    assert (tmp_path / "again" / TRAINER_COPY).read_bytes() == (target / TRAINER_COPY).read_bytes()
    assert is_adapter_checkpoint(target)
    second.save_pretrained(target)
    check_trainer_copy(target, second)
    fastpeft.save_adapter(first, target)
    assert names(target) == ADAPTER_FILES


@pytest.mark.parametrize("model_file", ["config.json", "model.safetensors", "pytorch_model.bin",
                                        "model.safetensors.index.json"])
def test_a_models_directory_gets_no_copy_and_keeps_its_files(tmp_path, model_file):
    """Into a directory holding a transformers model's files (its config, or weights fastpeft
    did not write), ``save_pretrained`` writes the adapter only: the model's files stay byte
    for byte, and no copy shadows them (Trainer and ``from_pretrained`` prefer
    ``model.safetensors`` to the others)."""
    tiny_llama(0).save_pretrained(tmp_path / "full")  # config.json + a real model.safetensors
    source = tmp_path / "full" / model_file
    planted = source.read_bytes() if source.exists() else b'{"weight_map": {}}'
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / model_file).write_bytes(planted)
    adapted(1).save_pretrained(tmp_path / "adapter")
    assert names(tmp_path / "adapter") == ADAPTER_FILES | {model_file}
    assert (tmp_path / "adapter" / model_file).read_bytes() == planted
    assert is_adapter_checkpoint(tmp_path / "adapter") == (model_file == "config.json")


def test_a_copy_is_removed_where_it_can_no_longer_be_written(tmp_path):
    """A copy of an earlier save goes once the directory holds a model's config: the new save
    cannot write one there, and an old one would be stale."""
    adapted(1).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    adapted(2).save_pretrained(tmp_path)
    assert names(tmp_path) == ADAPTER_FILES | {"config.json"}


def test_loaders_never_read_the_copy(tmp_path):
    """``load_adapter`` and ``load_adapter_weights`` read the adapter's files: a copy that is
    garbage changes nothing."""
    model = adapted(1)
    model.save_pretrained(tmp_path)
    (tmp_path / TRAINER_COPY).write_bytes(b"garbage")
    loaded = fastpeft.load_adapter(tiny_llama(0), tmp_path)
    other = adapted(2)
    fastpeft.integrations.load_adapter_weights(other, tmp_path)
    for target in (loaded, other):
        mine = dict(target.named_parameters())
        assert all(torch.equal(mine[n], p) for n, p in model.named_parameters() if p.requires_grad)


def _header_file(length: int, header: bytes) -> bytes:
    return length.to_bytes(8, "little") + header


@pytest.mark.parametrize("content", [
    pytest.param(lambda: safetensors.torch.save({"w": torch.zeros(2)}, metadata={"format": "pt"}), id="unmarked"),
    pytest.param(lambda: safetensors.torch.save({"w": torch.zeros(2)}, metadata={"fastpeft": "other"}),
                 id="other-mark"),
    pytest.param(lambda: _header_file(trainer_copy.MAX_HEADER_BYTES + 1, b"{}"), id="header-too-long"),
    pytest.param(lambda: _header_file(100, b'{"__metadata__": {"fastpeft": "adapter-only"}}'), id="truncated"),
    pytest.param(lambda: _header_file(4, b"\xff\xfe{}"), id="not-utf8"),
    pytest.param(lambda: _header_file(2, b"[]"), id="not-an-object"),
    pytest.param(lambda: b"\x01", id="shorter-than-the-length"),
    pytest.param(lambda: b"", id="empty"),
])
def test_only_a_marked_header_is_a_copy(tmp_path, content):
    """Any other ``model.safetensors`` is not a copy (so a save leaves it alone and
    ``is_adapter_checkpoint`` sees a model); a marked one is."""
    (tmp_path / TRAINER_COPY).write_bytes(content())
    assert not is_copy(tmp_path)
    (tmp_path / TRAINER_COPY).write_bytes(trainer_copy.copy_bytes({"w": torch.zeros(2)}))
    assert is_copy(tmp_path)


@pytest.mark.parametrize("make", [
    pytest.param(os.mkfifo, id="fifo"),
    pytest.param(os.mkdir, id="directory"),
    pytest.param(lambda path: os.symlink("/dev/zero", path), id="link-to-dev-zero"),
])
def test_special_files_are_not_copies_and_are_left_alone(tmp_path, make):
    """A FIFO without a writer (reading would block), a directory or a link to ``/dev/zero``
    (an endless read) under the name is not a copy, answered at once, and a save leaves it
    there (writing no copy)."""
    make(tmp_path / TRAINER_COPY)
    answer = []
    thread = threading.Thread(target=lambda: answer.append(is_copy(tmp_path)), daemon=True)
    thread.start()
    thread.join(30)
    assert answer == [False]
    adapted(1).save_pretrained(tmp_path)
    assert names(tmp_path) == ADAPTER_FILES | {TRAINER_COPY}
    assert not (tmp_path / TRAINER_COPY).is_file() or (tmp_path / TRAINER_COPY).is_symlink()


def test_a_large_model_file_is_not_read_whole(tmp_path, monkeypatch):
    """Telling a copy from a full model's ``model.safetensors`` reads its header only."""
    model_file = tmp_path / TRAINER_COPY
    model_file.write_bytes(safetensors.torch.save({"w": torch.zeros(4 << 20)}))  # 16 MiB of data
    header_bytes = 8 + int.from_bytes(model_file.read_bytes()[:8], "little")
    read = []
    original = os.read

    def counted(fd: int, n: int) -> bytes:
        data = original(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counted)
    assert not is_copy(tmp_path)
    assert sum(read) == 8 + header_bytes  # the length, then the header
