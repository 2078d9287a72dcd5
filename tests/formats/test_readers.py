"""Every adapter reader on files it must not trust: special files under an adapter file's
name (``/dev/zero``, ``/dev/urandom``, a FIFO, a directory), files over the size caps,
crafted save journals; and the path types, dtypes and symlinks it must take or refuse.

Readers: ``fastpeft.load_adapter`` on PEFT LoRA, AdapterHub and PEFT prompt directories,
``load_adapter_weights`` and ``MultiAdapterModel.load_adapter``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastpeft
from fastpeft.api import adapter_state_dict
from fastpeft.formats import safe_read, save_journal
from fastpeft.integrations import is_adapter_checkpoint, load_adapter_weights
from fastpeft.serving import MultiAdapterModel
from tests.helpers.models import TinyNet, tiny_llama

CONFIG = "adapter_config.json"
LORA = fastpeft.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
# reader -> (adapter config, the weight file it reads, a call reading ``directory``)
READERS = {
    "lora": (LORA, "adapter_model.safetensors", lambda d: fastpeft.load_adapter(TinyNet(), d)),
    "adapterhub": (fastpeft.AdapterConfig("seq_bn"), "adapter.safetensors",
                   lambda d: fastpeft.load_adapter(tiny_llama(), d)),
    "prompt": (fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "adapter_model.safetensors",
               lambda d: fastpeft.load_adapter(tiny_llama(), d)),
    "weights": (LORA, "adapter_model.safetensors",
                lambda d: load_adapter_weights(fastpeft.inject(TinyNet(), LORA), d)),
    "multi": (LORA, "adapter_model.safetensors",
              lambda d: MultiAdapterModel(TinyNet(), max_rank=4, target_modules=["proj"]).load_adapter("x", d)),
}


def saved(reader: str, directory: Path) -> Path:
    """``directory`` with a saved adapter of the kind ``reader`` reads."""
    config = READERS[reader][0]
    model = TinyNet() if isinstance(config, fastpeft.LoraConfig) else tiny_llama()
    fastpeft.save_adapter(fastpeft.inject(model, config), directory)
    return directory


def read(reader: str, directory) -> None:
    READERS[reader][2](directory)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _replace(path: Path, make) -> None:
    path.unlink()
    make(path)


SPECIAL = {
    "dev-zero": (lambda p: p.symlink_to("/dev/zero"), "a character device"),
    "dev-urandom": (lambda p: p.symlink_to("/dev/urandom"), "a character device"),
    "fifo": (os.mkfifo, "a FIFO"),
    "directory": (lambda p: p.mkdir(), "a directory"),
}


@pytest.mark.timeout(60)  # a reader that opened the FIFO or /dev/zero would hang or exhaust memory
@pytest.mark.parametrize("special", SPECIAL)
@pytest.mark.parametrize("which", ["config", "weights"])
@pytest.mark.parametrize("reader", READERS)
def test_special_files_are_refused_naming_the_file(tmp_path, reader, which, special):
    directory = saved(reader, tmp_path)
    name = CONFIG if which == "config" else READERS[reader][1]
    make, kind = SPECIAL[special]
    _replace(directory / name, make)
    before = open_fds()
    for _ in range(3):
        with pytest.raises(ValueError, match=f"{directory / name}.* is {kind}, not a regular file"):
            read(reader, directory)
    assert open_fds() == before, "a descriptor leaked"


@pytest.mark.parametrize("reader", READERS)
def test_files_over_the_caps_are_refused(tmp_path, reader, monkeypatch):
    directory = saved(reader, tmp_path)
    weights = READERS[reader][1]
    monkeypatch.setattr(safe_read, "MAX_TENSOR_BYTES", (directory / weights).stat().st_size - 1)
    with pytest.raises(ValueError, match=f"{directory / weights}.* is {(directory / weights).stat().st_size} bytes, "
                                         "more than"):
        read(reader, directory)
    monkeypatch.undo()
    monkeypatch.setattr(safe_read, "MAX_CONFIG_BYTES", (directory / CONFIG).stat().st_size - 1)
    with pytest.raises(ValueError, match=f"{directory / CONFIG}.* bytes, more than"):
        read(reader, directory)
    monkeypatch.undo()
    read(reader, directory)  # within the caps it loads


@pytest.mark.parametrize("reader", READERS)
def test_each_file_is_read_once_per_load(tmp_path, reader, monkeypatch):
    """Format detection and the loader share the snapshot's reads: the config is read from
    the disk once, as is the weight file (and the save journal is looked for once)."""
    directory = saved(reader, tmp_path / "adapter")
    reads: list[str] = []
    real = safe_read.read_regular

    def counted(fd, name, *args):
        reads.append(name)
        return real(fd, name, *args)

    monkeypatch.setattr(safe_read, "read_regular", counted)
    read(reader, directory)
    assert sorted(reads) == sorted([save_journal.JOURNAL_NAME, CONFIG, READERS[reader][1]])  # (no journal here)


@pytest.mark.parametrize("reader", READERS)
def test_symlinked_files_are_read(tmp_path, reader):
    """The Hub's cache links each file of a snapshot to a blob: links to regular files are fine."""
    directory = saved(reader, tmp_path / "adapter")
    (tmp_path / "blobs").mkdir()
    for name in os.listdir(directory):
        (directory / name).rename(tmp_path / "blobs" / name)
        (directory / name).symlink_to(tmp_path / "blobs" / name)
    read(reader, directory)


@pytest.mark.parametrize("reader", READERS)
def test_bytes_paths_load_like_str_paths_and_other_types_are_refused(tmp_path, reader):
    directory = os.fsencode(tmp_path / "adapter")
    config = READERS[reader][0]
    model = TinyNet() if isinstance(config, fastpeft.LoraConfig) else tiny_llama()
    fastpeft.save_adapter(fastpeft.inject(model, config), directory)
    read(reader, directory)
    with pytest.raises(TypeError, match="must be a str, bytes or os.PathLike path, got int"):
        read(reader, 3)
    with pytest.raises(TypeError, match="must be a str, bytes or os.PathLike path, got int"):
        fastpeft.save_adapter(fastpeft.inject(TinyNet(), LORA), 3)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
@pytest.mark.parametrize("reader", ["lora", "weights", "multi"])
def test_integer_and_bool_lora_weights_are_refused(tmp_path, reader, dtype):
    directory = saved(reader, tmp_path)
    path = directory / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].to(dtype)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    with pytest.raises(ValueError, match=f"{module}.*(dtype {dtype}, expected a floating point dtype|must be floating "
                                         f"point, got {dtype})"):
        read(reader, directory)


def _journal(directory: Path, renames: list[list[str]], removes: list[str]) -> None:
    (directory / save_journal.JOURNAL_NAME).write_text(
        f'{{"format": "fastpeft-save-journal/1", "hide": [], "renames": {renames!r}, "removes": {removes!r}}}'
        .replace("'", '"'))


@pytest.mark.parametrize("journal", [
    ([], ["notes.txt"]),
    ([["../outside", "adapter_config.json"]], []),
    ([[".notes.txt.tmp-1-0000000000000000", "notes.txt"]], []),
])
def test_crafted_journals_are_refused_and_touch_nothing(tmp_path, journal):
    directory = saved("lora", tmp_path / "adapter")
    (directory / "notes.txt").write_text("keep")
    (tmp_path / "outside").write_text("keep")
    _journal(directory, *journal)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="names files that are not an adapter's"):
        read("lora", directory)
    with pytest.raises(ValueError, match="names files that are not an adapter's"):
        fastpeft.save_adapter(fastpeft.inject(TinyNet(), LORA), directory)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_journal_whose_files_were_deleted_is_reported_by_loads_and_replaced_by_saves(tmp_path):
    directory = saved("lora", tmp_path)
    _journal(directory, [[".adapter_model.safetensors.tmp-1-0000000000000000", "adapter_model.safetensors"]], [])
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="cannot be completed: both 'adapter_model.safetensors' and its temp"):
        read("lora", directory)
    fastpeft.save_adapter(fastpeft.inject(TinyNet(), LORA), directory)
    read("lora", directory)
    assert sorted(os.listdir(directory)) == [CONFIG, "adapter_model.safetensors"]


def test_a_directory_in_the_way_of_a_saved_file_is_refused_before_anything_changes(tmp_path):
    directory = saved("lora", tmp_path)
    before = (directory / CONFIG).read_bytes()
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="adapter_model.safetensors.*a directory has that name"):
        fastpeft.save_adapter(fastpeft.inject(TinyNet(), fastpeft.LoraConfig(r=3, target_modules=["proj"])), directory)
    assert sorted(os.listdir(directory)) == [CONFIG, "adapter_model.safetensors"]
    assert (directory / CONFIG).read_bytes() == before


def test_is_adapter_checkpoint_on_odd_paths(tmp_path):
    assert is_adapter_checkpoint(saved("lora", tmp_path / "adapter"))
    assert is_adapter_checkpoint(os.fsencode(tmp_path / "adapter"))
    (tmp_path / "file").write_text("x")
    assert not is_adapter_checkpoint(tmp_path / "file")
    assert not is_adapter_checkpoint(tmp_path / "missing")


def test_a_reader_waits_for_a_save_holding_the_lock(tmp_path):
    """While a writer holds the directory's exclusive lock (a save in progress), a load
    blocks, and completes once the lock is released."""
    directory = saved("lora", tmp_path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (read("lora", directory), done.set()))
    thread.start()
    try:
        assert not done.wait(0.5), "the load did not wait for the save in progress"
    finally:
        os.close(fd)
    thread.join(30)
    assert done.is_set()


def test_readers_finding_a_killed_save_at_once_complete_it_once(tmp_path, monkeypatch):
    """A save that stopped after its commit point (a rename failed), then 8 threads loading
    at once: each takes the lock exclusively in turn to complete the save (no deadlock
    between their shared locks), and every one loads the new adapter."""
    directory = saved("lora", tmp_path)
    new = fastpeft.inject(TinyNet(seed=1), fastpeft.LoraConfig(r=3, target_modules=["proj"], init_lora_weights=False))
    original = os.replace

    def failing_weights_rename(src, dst, **kwargs):
        if dst == "adapter_model.safetensors":
            raise OSError(errno.EIO, "simulated")
        return original(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", failing_weights_rename)
    with pytest.raises(OSError, match="simulated"):
        fastpeft.save_adapter(new, directory)
    monkeypatch.undo()
    assert save_journal.JOURNAL_NAME in os.listdir(directory)
    results, barrier = [], threading.Barrier(8)

    def load() -> None:
        barrier.wait()
        results.append(adapter_state_dict(fastpeft.load_adapter(TinyNet(), directory)))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    expected = adapter_state_dict(new)
    assert len(results) == 8
    assert all(r.keys() == expected.keys() and all(torch.equal(r[k], expected[k]) for k in r) for r in results)
    assert sorted(os.listdir(directory)) == [CONFIG, "adapter_model.safetensors"]


def test_a_directory_named_like_a_stale_file_is_left_alone(tmp_path):
    """A save removes other saves' files (a stale adapter_model.bin); a directory under that
    name is no save's file: the save succeeds, leaves it, and the adapter loads."""
    directory = saved("lora", tmp_path)
    (directory / "adapter_model.bin").mkdir()
    (directory / "adapter_model.bin" / "inside.txt").write_text("keep")
    fastpeft.save_adapter(fastpeft.inject(TinyNet(), fastpeft.LoraConfig(r=3, target_modules=["proj"])), directory)
    assert (directory / "adapter_model.bin" / "inside.txt").read_text() == "keep"
    assert save_journal.JOURNAL_NAME not in os.listdir(directory)
    read("lora", directory)
