"""A consistent view of an adapter directory: what every fastpeft reader reads through.

``open_snapshot(directory, allowed)`` opens the directory and, while the block runs:

* holds a shared ``flock`` on it, so a save by fastpeft (which holds it exclusively) is
  either finished before the first read or starts after the last: the reader gets one
  save's files, never one save's config with another's weights, and does not fail because
  a save is in progress (it waits for it);
* completes a save that was killed after its commit point (``save_journal``): with write
  access it rolls the journal forward on disk (so PEFT sees the new adapter too), and
  without it reads each name from the temp file the journal gives;
* reads files through ``safe_read``: regular files only (a FIFO, device or directory under
  an adapter file's name is refused, never read), capped in size, each error naming the file.

On a filesystem without directory locks (some NFS mounts) the reader does not wait for a
save in progress and may see a mix of two saves, as two writers may leave one there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
from collections.abc import Callable, Iterator

import safetensors.torch
import torch

from fastpeft.formats import safe_read, safe_write, save_journal


class Snapshot:
    """The files of one save of an adapter directory (see the module docstring). Valid only
    inside the ``open_snapshot`` block that made it."""

    def __init__(self, fd: int, path: str, journal: save_journal.Journal | None) -> None:
        self._fd, self.path, self._journal = fd, path, journal
        # name -> bytes of each JSON file read: detection and loading both read the config,
        # from the disk once (and, without directory locks, the same version each time).
        self._json_bytes: dict[str, bytes] = {}

    def file_path(self, name: str) -> str:
        """``name``'s path, for messages."""
        return os.path.join(self.path, name)

    def _source(self, name: str) -> str | None:
        return self._journal.source(name) if self._journal is not None else name

    def exists(self, name: str) -> bool:
        """Whether the save has something (a file or anything else) under ``name``."""
        source = self._source(name)
        return source is not None and safe_read.exists(self._fd, source)

    def read_bytes(self, name: str, limit: int) -> bytes:
        """``name``'s contents (a regular file of at most ``limit`` bytes).

        Raises:
            FileNotFoundError: ``no <name> in <directory>``.
            ValueError: not a regular file, or larger than ``limit``.
        """
        return self._read(name, lambda source: safe_read.read_regular(self._fd, source, limit, self.file_path(name)))

    def read_head(self, name: str, size: int) -> bytes:
        """The first ``size`` bytes of ``name`` (a regular file; all of it if shorter): a
        header, without reading a large file whole. Raises as ``read_bytes``."""
        return self._read(name, lambda source: safe_read.read_head(self._fd, source, size, self.file_path(name)))

    def _read(self, name: str, read: Callable[[str], bytes]) -> bytes:
        """``read(source)`` of the file the save has under ``name``, errors naming it."""
        source = self._source(name)
        try:
            if source is None:
                raise FileNotFoundError
            return read(source)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no {name} in {self.path!r}") from None
        except OSError as exc:
            raise ValueError(f"{self.file_path(name)!r} could not be read: {exc}") from exc

    def read_json(self, name: str) -> object:
        """``name`` parsed as JSON (a new object per call; the file is read once per snapshot);
        ValueError for an unreadable or broken file."""
        data = self._json_bytes.get(name)
        if data is None:
            data = self._json_bytes[name] = self.read_bytes(name, safe_read.MAX_CONFIG_BYTES)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.file_path(name)!r} is not a readable JSON file: {exc}") from exc
        except RecursionError:
            raise ValueError(f"{self.file_path(name)!r} nests JSON values too deeply to be an adapter config") \
                from None

    def read_safetensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of the safetensors file ``name``, on the CPU."""
        data = self.read_bytes(name, safe_read.MAX_TENSOR_BYTES)
        try:
            return safetensors.torch.load(data)
        except Exception as exc:
            raise ValueError(f"{self.file_path(name)!r} is not a readable safetensors file: {exc}") from exc

    def read_pickle(self, name: str) -> dict[str, torch.Tensor]:
        """The ``str -> tensor`` dict in the pickle file ``name``, read with
        ``torch.load(weights_only=True)`` (no code runs), on the CPU."""
        data = self.read_bytes(name, safe_read.MAX_TENSOR_BYTES)
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{self.file_path(name)!r} could not be loaded with torch.load(weights_only=True): "
                             f"{exc}") from exc
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ValueError(f"{self.file_path(name)!r} does not hold a dict of str -> tensor")
        return tensors

    def read_weights(self, safetensors_name: str, pickle_name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
        """An adapter's weight file, on the CPU: ``safetensors_name`` if the save has it, else
        the pickle ``pickle_name``, read only with ``allow_pickle`` (``read_pickle``).

        Raises:
            FileNotFoundError: neither file.
            ValueError: a pickle without ``allow_pickle``; an unreadable file.
        """
        if self.exists(safetensors_name):
            return self.read_safetensors(safetensors_name)
        if not self.exists(pickle_name):
            raise FileNotFoundError(errno.ENOENT, f"no {safetensors_name} (or {pickle_name}) in {self.path!r}")
        if not allow_pickle:
            raise ValueError(f"{self.file_path(pickle_name)!r} is a pickle file and is not loaded by default; pass "
                             "allow_pickle=True to load it with torch.load(weights_only=True), or convert it to "
                             "safetensors")
        return self.read_pickle(pickle_name)


def _complete_killed_save(fd: int, path: str, allowed: frozenset[str]) -> save_journal.Journal | None:
    """With the shared lock held and a journal present: take the lock exclusively, roll the
    journal forward, and go back to the shared lock; None once done. Without write access
    the journal is returned, for reads through it."""
    fcntl.flock(fd, fcntl.LOCK_EX)  # a conversion: other readers finish first
    try:
        journal = save_journal.read_journal(fd, path, allowed)  # another reader may have completed it meanwhile
        if journal is None:
            return None
        try:
            save_journal.roll_forward(safe_write.Directory(fd, path, locked=True), journal)
        except OSError as exc:
            if exc.errno not in safe_write.NOT_WRITABLE:
                raise
            return journal
        return None
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH)


@contextlib.contextmanager
def open_snapshot(directory: str | bytes | os.PathLike, allowed: frozenset[str]) -> Iterator[Snapshot]:
    """A ``Snapshot`` of the adapter directory ``directory`` for the duration of the block
    (see the module docstring); ``allowed``: the adapter file names a save journal may name.

    Raises:
        TypeError: ``directory`` is not a path.
        FileNotFoundError: ``directory`` does not exist.
        NotADirectoryError: it is not a directory.
        ValueError: a save journal that cannot be applied.
    """
    path = safe_write.fs_path(directory)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"adapter directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, f"adapter path {path!r} is not a directory: an adapter is a "
                                 "directory holding its config and weight files")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        locked = safe_write.flock(fd, fcntl.LOCK_SH)
        journal = save_journal.read_journal(fd, path, allowed)
        if journal is not None and locked:
            journal = _complete_killed_save(fd, path, allowed)
        yield Snapshot(fd, path, journal)
    finally:
        os.close(fd)  # also releases the flock


class CopiedSnapshot(Snapshot):
    """The files of one ``Snapshot`` that another process read (``copy_files``), read the same
    way: what every rank of a sharded model loads, rank 0 having read the directory."""

    def __init__(self, path: str, files: dict[str, bytes]) -> None:
        super().__init__(-1, path, None)
        self._files = files

    def exists(self, name: str) -> bool:
        return name in self._files

    def read_bytes(self, name: str, limit: int) -> bytes:
        if len(self._copied(name)) > limit:
            raise ValueError(f"{self.file_path(name)!r} is larger than {limit} bytes")
        return self._files[name]

    def read_head(self, name: str, size: int) -> bytes:
        return self._copied(name)[:size]

    def _copied(self, name: str) -> bytes:
        if name not in self._files:
            raise FileNotFoundError(errno.ENOENT, f"no {name} in {self.path!r}")
        return self._files[name]


def copy_files(snapshot: Snapshot, names: frozenset[str]) -> dict[str, bytes]:
    """The contents of the snapshot's files among ``names`` (each capped as a weight file is),
    for a ``CopiedSnapshot``."""
    return {name: snapshot.read_bytes(name, safe_read.MAX_TENSOR_BYTES) for name in sorted(names)
            if snapshot.exists(name)}
