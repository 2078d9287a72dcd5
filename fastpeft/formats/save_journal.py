"""All-or-nothing saves of several files into a directory, through a commit record.

A directory entry can be replaced atomically (``rename``), a set of them cannot. An
adapter is a set (``adapter_config.json`` + a weight file, and for some prompt encoders a
third file), and the names are fixed by the formats (PEFT and AdapterHub must still read
them), so ``save_files`` makes a set of replacements atomic with a journal:

1. (flock held) a journal left by a killed save is rolled forward (``recover``);
2. every new file is written to a temp file beside its name and fsynced (``safe_write.stage``);
3. the journal, ``.fastpeft-save-journal.json``, naming each temp file and its final name
   and the names to remove, is written to a temp file, fsynced, renamed into place, and the
   directory fsynced. **This is the commit point**: before it the directory holds the old
   files (a crash leaves only temp files, removed by the next save); from it on, the save
   has happened;
4. ``roll_forward``: the file listed under ``hide`` (the config, when it changes) is
   removed, each temp file is renamed over its name (the config last), the listed names
   are removed, the directory is fsynced, and the journal removed.

A crash in step 4 leaves the journal: the next save, and every fastpeft reader
(``fastpeft.formats.snapshot``), rolls it forward, or, without write access, reads each name
from the temp file the journal gives for it. So a fastpeft reader always sees exactly the
old files or exactly the new ones.

A reader that knows nothing of the journal (PEFT, AdapterHub) sees, while step 4 runs or
after a crash in it until fastpeft next opens the directory: the old files, the new ones,
or, while a changed config is swapped, no config at all (``hide``) -- it then fails
loudly, and never pairs one save's config with another's weights.

Journals are trusted only as far as their names: every name must be one of the names the
caller allows (the adapter files), and every temp file the temp name of its final name,
so a crafted journal cannot rename or remove anything else.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fastpeft.formats import safe_read, safe_write

JOURNAL_NAME = ".fastpeft-save-journal.json"
_FORMAT = "fastpeft-save-journal/1"
# Files at most this large are compared with the one already saved, and not rewritten when
# equal (a config that did not change: the weights alone are then replaced, by one rename,
# which any reader sees atomically). Larger ones (weights) are always rewritten: comparing
# would read them back in full.
_COMPARE_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Journal:
    """One committed save: ``renames`` ``(temp file, final name)`` in the order they are
    applied, ``hide`` the names removed before them, ``removes`` the names removed after."""

    hide: tuple[str, ...]
    renames: tuple[tuple[str, str], ...]
    removes: tuple[str, ...]

    def to_bytes(self) -> bytes:
        return json.dumps({"format": _FORMAT, "hide": list(self.hide), "renames": [list(r) for r in self.renames],
                           "removes": list(self.removes)}, indent=1).encode()

    def source(self, name: str) -> str | None:
        """The entry that holds ``name``'s committed contents before the roll forward: its
        temp file, or the name itself; None when the save removes it."""
        for temp, final in self.renames:
            if final == name:
                return temp
        return None if name in self.removes else name


def _parse(data: bytes, allowed: frozenset[str], display: str) -> Journal:
    """A journal's contents, checked against the names the caller allows."""
    try:
        raw = json.loads(data)
        if raw.get("format") != _FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {_FORMAT!r}")
        journal = Journal(tuple(raw["hide"]), tuple((t, n) for t, n in raw["renames"]), tuple(raw["removes"]))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{display!r} is not a fastpeft save journal: {exc}") from exc
    names = [*journal.hide, *(n for _, n in journal.renames), *journal.removes]
    foreign = sorted({str(n) for n in names if n not in allowed})
    bad_temps = [t for t, n in journal.renames if not safe_write.is_temp_of(t, n)]
    if foreign or bad_temps:
        raise ValueError(f"{display!r} names files that are not an adapter's ({foreign + bad_temps}); "
                         "refusing to apply it")
    return journal


def read_journal(dir_fd: int, display: str, allowed: frozenset[str]) -> Journal | None:
    """The journal in the directory (``display`` its path), or None if there is none."""
    path = os.path.join(display, JOURNAL_NAME)
    try:
        data = safe_read.read_regular(dir_fd, JOURNAL_NAME, safe_read.MAX_CONFIG_BYTES, path)
    except FileNotFoundError:
        return None
    return _parse(data, allowed, path)


def roll_forward(target: safe_write.Directory, journal: Journal) -> None:
    """Apply a committed journal (flock held): hide, rename, remove, fsync, drop the journal.
    Idempotent, so a crash in it is recovered by running it again.

    Raises:
        FileNotFoundError: a final name and its temp file are both missing (removed by
            hand): the save cannot be completed.
    """
    pending = {final for temp, final in journal.renames if safe_read.exists(target.fd, temp)}
    for name in journal.hide:
        if name in pending:
            safe_write.remove(target, name)
    for temp, final in journal.renames:
        if final in pending:
            safe_write.commit(target, temp, final)
        elif not safe_read.exists(target.fd, final):
            raise FileNotFoundError(errno.ENOENT, f"the save recorded in {os.path.join(target.path, JOURNAL_NAME)!r} "
                                    f"cannot be completed: both {final!r} and its temp file {temp!r} are missing")
    for name in journal.removes:
        safe_write.remove(target, name)
    safe_write.sync(target)
    safe_write.remove(target, JOURNAL_NAME)
    safe_write.sync(target)


def recover(target: safe_write.Directory, allowed: frozenset[str]) -> bool:
    """Roll forward the journal a killed save left in ``target`` (flock held); False if none."""
    journal = read_journal(target.fd, target.path, allowed)
    if journal is None:
        return False
    roll_forward(target, journal)
    return True


def _unchanged(target: safe_write.Directory, name: str, data: bytes) -> bool:
    if len(data) > _COMPARE_MAX_BYTES:
        return False
    try:
        return safe_read.read_regular(target.fd, name, len(data), name) == data
    except (OSError, ValueError):
        return False


def _is_dir(target: safe_write.Directory, name: str) -> bool:
    """Whether ``name`` in the directory is a directory (a symlink is not)."""
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=target.fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _check_replaceable(target: safe_write.Directory, names: Iterable[str]) -> None:
    """A rename over a directory fails: find out before the commit point, not after it."""
    for name in names:
        if _is_dir(target, name):
            raise IsADirectoryError(errno.EISDIR, f"cannot save {name!r} into {target.path!r}: a directory has "
                                    "that name")


def _require_allowed(files: Mapping[str, bytes], removes: Iterable[str], allowed: frozenset[str]) -> None:
    names = {*files, *removes}
    if not names <= allowed:
        raise ValueError(f"save_files: {sorted(names - allowed)} are not among the allowed names")


def save_files(path: str | os.PathLike, files: Mapping[str, bytes], *, removes: Iterable[str] = (),
               hide: Iterable[str] = (), allowed: frozenset[str],
               adjust: Callable[[safe_write.Directory], tuple[Mapping[str, bytes], Iterable[str]]] | None = None,
               ) -> None:
    """Replace ``files`` (name -> contents, renamed in this order) in the directory ``path``
    and remove ``removes``, all in one commit (see the module docstring). ``hide`` names
    the file (the config) removed first when it changes. ``allowed``: every name a journal
    of this directory may hold (``files`` and ``removes`` must be among them). ``adjust``:
    called with the open directory once this save holds its lock (and a killed save is
    completed), returns the ``(files, removes)`` to save instead: for a choice that depends on
    what the directory holds, made where no other fastpeft save can change it.

    Raises:
        NotADirectoryError / PermissionError: as ``safe_write.open_directory`` / ``stage``.
        IsADirectoryError: a directory has one of ``files``' names; nothing is changed.
        OSError: an I/O error. Before the commit point the old files stay (temp files are
            removed); after it, the save is completed by the next save or fastpeft read.
    """
    removes, hide = tuple(removes), frozenset(hide)
    _require_allowed(files, removes, allowed)
    with safe_write.open_directory(path) as target:
        try:
            recover(target, allowed)
        except FileNotFoundError:  # an earlier save's files were removed by hand: this save replaces them all
            safe_write.remove(target, JOURNAL_NAME)
        if adjust is not None:
            files, removes = adjust(target)
            _require_allowed(files, removes, allowed)
        removes = tuple(removes)
        safe_write.remove_stale_temps(target, {*allowed, JOURNAL_NAME})
        _check_replaceable(target, files)
        changed = {name: data for name, data in files.items() if not _unchanged(target, name, data)}
        # A directory under a removed name is not a file of any save: left alone (unlinking
        # it would fail after the commit point).
        removed = tuple(name for name in removes if safe_read.exists(target.fd, name) and not _is_dir(target, name))
        if not changed and not removed:
            return
        staged: dict[str, str] = {}
        committed = False
        try:
            for name, data in changed.items():
                staged[name] = safe_write.stage(target, name, data)
            journal = Journal(tuple(n for n in staged if n in hide), tuple((t, n) for n, t in staged.items()), removed)
            temp = safe_write.stage(target, JOURNAL_NAME, journal.to_bytes())
            try:
                safe_write.commit(target, temp, JOURNAL_NAME)
            except BaseException:
                safe_write.remove(target, temp)
                raise
            committed = True
        finally:
            if not committed:
                for temp in staged.values():
                    safe_write.remove(target, temp)
        safe_write.sync(target)  # the commit point is durable before any old file goes
        roll_forward(target, journal)
