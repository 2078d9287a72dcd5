"""Reading an adapter's files without trusting them: regular files only, capped in size.

An adapter directory may come from anywhere (a download, a shared mount), so a name in it
may be a symlink to ``/dev/zero`` (reads forever), a FIFO (blocks forever), a directory or
a huge sparse file. ``read_regular`` opens the name (symlinks followed, as the Hub's cache
uses them), refuses anything that is not a regular file before reading a byte, and reads
at most ``limit`` bytes; it never blocks on a FIFO and never leaks its descriptor.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

# Largest config file read (adapter_config.json and the like). PEFT's configs are a few KB;
# a target_modules list naming every linear of a 1000-layer model is under 1 MiB.
MAX_CONFIG_BYTES = 16 << 20
# Largest tensor file read. LoRA at r = 256 on every linear of a 405B Llama in float32 is
# ~40 GB (126 layers x 256 x 309k in+out features x 4 bytes); files are read into memory,
# so a larger one is refused rather than exhausting it.
MAX_TENSOR_BYTES = 64 << 30
# How much one read() asks for: large enough that a multi-GB file takes few calls.
_CHUNK_BYTES = 64 << 20

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _require_regular(mode: int, display: str) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ValueError(f"{display!r} is {kind}, not a regular file: adapter files must be regular files")


def exists(dir_fd: int, name: str) -> bool:
    """Whether anything (a dangling symlink too) has ``name`` in the directory."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


@contextlib.contextmanager
def _open_regular(dir_fd: int, name: str, display: str) -> Iterator[tuple[int, int]]:
    """The regular file ``name`` opened read-only: (descriptor, size), closed after the block."""
    _require_regular(os.stat(name, dir_fd=dir_fd).st_mode, display)  # before open: a device is never opened
    # O_NONBLOCK: if the name was swapped for a FIFO since the stat, open does not wait for a writer.
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        _require_regular(info.st_mode, display)
        yield fd, info.st_size
    finally:
        os.close(fd)


def _read(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the start of ``fd`` (fewer if the file ends first)."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, _CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_regular(dir_fd: int, name: str, limit: int, display: str) -> bytes:
    """The contents of the regular file ``name`` in the directory ``dir_fd`` (symlinks
    followed); ``display`` is its path for messages.

    Raises:
        FileNotFoundError: no such file.
        ValueError: it is not a regular file (directory, FIFO, device, socket), or larger
            than ``limit`` bytes.
    """
    with _open_regular(dir_fd, name, display) as (fd, size):
        if size > limit:
            raise ValueError(f"{display!r} is {size} bytes, more than the {limit} bytes fastpeft reads "
                             "from such an adapter file")
        return _read(fd, size)


def read_head(dir_fd: int, name: str, size: int, display: str) -> bytes:
    """The first ``size`` bytes of the regular file ``name`` (all of it if shorter): a
    header, read without reading a large file whole.

    Raises:
        FileNotFoundError: no such file.
        ValueError: it is not a regular file.
    """
    with _open_regular(dir_fd, name, display) as (fd, _):
        return _read(fd, size)
