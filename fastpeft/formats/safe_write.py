"""Crash-safe replacement of named files inside a directory that is itself left in place.

``save_adapter`` must not rename, recreate or copy the directory it saves into (it may be a
mount point, a symlink, the working directory, or hold files other processes are writing),
so its files are replaced one by one with these primitives:

* ``open_directory`` creates the directory like ``os.makedirs`` (umask and a setgid parent
  honoured, symlinks followed), opens it, and takes an exclusive ``flock`` on it, which
  serializes writers that use this module (threads and processes alike) for the duration;
* ``stage`` writes a file's new contents to ``.<name>.tmp-<pid>-<random>`` in that directory
  (mode ``0o666`` less the umask, as ``open(path, "w")`` gives), flushed and fsynced;
* ``commit`` renames a staged file over its final name: a reader of that name sees the
  whole old file or the whole new one, never a partial write;
* ``sync`` fsyncs the directory, so completed renames and removals survive a power loss on
  filesystems that honour fsync;
* ``remove`` unlinks a name (durable after ``sync``);
* ``remove_stale_temps`` deletes the temp files that writers killed mid-save left behind.

Every operation goes through the directory's file descriptor (``dir_fd``), so a concurrent
rename of the path, or a change of the working directory, cannot redirect a write. POSIX only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Mode of new files before the umask is applied: what open(path, "w") uses.
_FILE_MODE = 0o666
# Mode of new directories before the umask is applied: what os.makedirs uses.
_DIR_MODE = 0o777
# Random bytes in a temp name (hex-encoded): two writers never pick the same name.
_RANDOM_BYTES = 8
# A temp name: the final name, the writer's pid (Linux pids have at most 7 digits, since
# pid_max <= 2**22) and the random part.
_TEMP_NAME = re.compile(rf"\.(?P<name>.+)\.tmp-(?P<pid>[1-9][0-9]{{0,6}})-[0-9a-f]{{{2 * _RANDOM_BYTES}}}")
# errno values of flock on a filesystem without directory locks: NFS gives EBADF for a
# read-only descriptor, ENOLCK without a lock manager; others EOPNOTSUPP or EINVAL.
NO_FLOCK = frozenset({errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})
# errno values meaning "this process may not write here".
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


@dataclass(frozen=True)
class Directory:
    """An open directory: ``fd`` for the operations, ``path`` for messages, and whether this
    process holds the ``flock`` that excludes other writers (False where the filesystem has
    no directory locks)."""

    fd: int
    path: str
    locked: bool


def fs_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as a str (a bytes path decoded as the filesystem encodes names), so that
    saving and loading take the same paths.

    Raises:
        TypeError: ``path`` is not a str, bytes or ``os.PathLike``.
    """
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"an adapter directory must be a str, bytes or os.PathLike path, got "
                        f"{type(path).__name__} {path!r}") from None


@contextmanager
def open_directory(path: str | bytes | os.PathLike) -> Iterator[Directory]:
    """Create ``path`` if needed (``os.makedirs``: umask honoured, intermediate directories
    created), open the directory it names (following symlinks) and hold an exclusive flock on
    it until the block exits. Each newly created directory's entry is fsynced in its parent.

    Raises:
        TypeError: ``path`` is not a path.
        NotADirectoryError: ``path`` exists and is not a directory.
        PermissionError: the directory cannot be created or opened.
    """
    path = fs_path(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot save into {path!r}: it exists and is not a directory")
    created = _missing_directories(path)
    os.makedirs(path, mode=_DIR_MODE, exist_ok=True)
    for new in created:  # each new directory's entry, deepest first, durable in its parent
        _sync_path(os.path.dirname(new) or ".")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield Directory(fd, path, flock(fd, fcntl.LOCK_EX))
    finally:
        os.close(fd)  # also releases the flock


def _missing_directories(path: str) -> list[str]:
    """The directories ``os.makedirs(path)`` would create, deepest first."""
    missing = []
    path = os.path.join(os.getcwd(), path)  # not normalized: "a/b/.." creates b, as the kernel walks it
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def flock(fd: int, operation: int) -> bool:
    """``fcntl.flock(fd, operation)`` (waiting for other holders); False if the filesystem
    does not support directory locks."""
    try:
        fcntl.flock(fd, operation)
    except OSError as exc:
        if exc.errno in NO_FLOCK:
            return False
        raise
    return True


def temp_name(name: str) -> str:
    """A fresh temp name for ``name``: ``.<name>.tmp-<pid>-<random>``."""
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(_RANDOM_BYTES)}"


def is_temp_of(temp: str, name: str) -> bool:
    """Whether ``temp`` is a temp name ``temp_name(name)`` gives (any pid and random part)."""
    match = _TEMP_NAME.fullmatch(temp)
    return bool(match) and match["name"] == name


def stage(directory: Directory, name: str, data: bytes) -> str:
    """Write ``data`` to a new temp file for ``name`` in the directory, fsync it, and return
    the temp file's name. On failure the temp file is removed.

    Raises:
        PermissionError: the directory is not writable (permissions or a read-only filesystem).
    """
    temp = temp_name(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, _FILE_MODE, dir_fd=directory.fd)
    except OSError as exc:
        if exc.errno in NOT_WRITABLE:
            raise PermissionError(exc.errno, f"cannot write into {directory.path!r}: {os.strerror(exc.errno)}") from exc
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove(directory, temp)
        raise
    return temp


def commit(directory: Directory, temp: str, name: str) -> None:
    """Rename the staged file ``temp`` over ``name`` (atomic: readers of ``name`` see the old
    file or the new one). Durable only after ``sync``."""
    os.replace(temp, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)


def remove(directory: Directory, name: str) -> bool:
    """Remove ``name`` from the directory; False if it did not exist. Durable only after ``sync``."""
    try:
        os.unlink(name, dir_fd=directory.fd)
    except FileNotFoundError:
        return False
    return True


def sync(directory: Directory) -> None:
    """fsync the directory, making the renames and removals so far durable."""
    _fsync_dir(directory.fd)


def _sync_path(path: str) -> None:
    """fsync the directory ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_dir(fd)
    finally:
        os.close(fd)


def _fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: this filesystem cannot fsync a directory
            raise


def remove_stale_temps(directory: Directory, names: Iterable[str]) -> None:
    """Remove the temp files for ``names`` that writers killed mid-save left behind.

    Runs only with the directory's flock held (so no writer using this module is between
    ``stage`` and ``commit``), and removes only temp files whose writer pid is not a live
    process on this machine, so the temp file of a live writer that does not take the lock
    is never removed. Without the lock (a filesystem without flock) it removes nothing."""
    if not directory.locked:
        return
    names = set(names)
    for entry in os.listdir(directory.fd):
        match = _TEMP_NAME.fullmatch(entry)
        if match and match["name"] in names and not _alive(int(match["pid"])):
            remove(directory, entry)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process (of any user) on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
