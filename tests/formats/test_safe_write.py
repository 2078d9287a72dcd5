"""save_adapter writes into the target directory in place: what a SIGKILL at a random point
leaves, concurrent writers, other files never touched, mount points, symlinks, ".",
"a/b/..", permissions (umask, setgid, read-only target or parent), stale temp files; and
load_adapter's check of its path.

Tests that need other processes fork them from one server process (the "zygote"), which
imports torch and fastpeft once: a fresh interpreter takes seconds to start, and the SIGKILL
test needs a new writer for every kill. For the same reason these tests use ``Stack``
below rather than tests/helpers/models.py (importing transformers takes seconds more).
Mount points and read-only filesystems are made in a private mount namespace (tmpfs), as
chmod does not stop root.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import itertools
import os
import pwd
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import LoraConfig
from fastpeft.api import adapter_state_dict
from fastpeft.formats import safe_write, save_journal
from tests.helpers.zygote import (
    NamespaceUnavailable,
    Zygote,
    give_to_nobody_if_root,
    reachable_temp_dir,
    run_as_nobody_if_root,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = [CONFIG, WEIGHTS]
# Width of Stack's layers: at rank 64 the weight file is 1 MiB, so writing it takes long
# enough that random SIGKILLs land mid-write.
WIDTH = 512
# name -> (rank, seed). "a" and "b" have the same config and different weights; "c" has
# another rank, so a mix of its files with another adapter's cannot load as either.
VARIANTS = {"a": (64, 1), "b": (64, 2), "c": (32, 3)}


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@functools.cache
def adapted(variant: str) -> nn.Module:
    """A Stack with the variant's adapter (random A and B); cached, never modified."""
    rank, seed = VARIANTS[variant]
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=r"layers\.\d+", init_lora_weights=False)
    return fastpeft.inject(Stack(), config)


@functools.cache
def reference_files(variant: str) -> dict[str, bytes]:
    """The bytes of the files a save of the variant writes."""
    with tempfile.TemporaryDirectory() as directory:
        fastpeft.save_adapter(adapted(variant), directory)
        return {name: (Path(directory) / name).read_bytes() for name in ADAPTER_FILES}


def loaded_variant(directory: Path | str, variants=tuple(VARIANTS)) -> str:
    """Which of ``variants`` ``fastpeft.load_adapter`` loads from ``directory`` (tensors equal)."""
    loaded = adapter_state_dict(fastpeft.load_adapter(Stack(), directory))
    matches = [v for v in variants if _same_tensors(loaded, adapter_state_dict(adapted(v)))]
    assert len(matches) == 1, f"{directory} loads as {matches or 'none'} of {variants}"
    return matches[0]


def _same_tensors(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def temp_files(directory: Path) -> list[str]:
    return [name for name in entries(directory) if ".tmp-" in name]


def zygote_warm() -> None:
    """What the zygote prepares before forking (``tests.helpers.zygote``): every variant's adapter."""
    for variant in VARIANTS:
        adapted(variant)


@pytest.fixture(scope="module")
def zygote():
    server = Zygote("tests.formats.test_safe_write")
    yield server
    server.close()


def _error_of(call) -> dict | None:
    """Run ``call``; None if it returns, else its exception's type name, errno and message."""
    try:
        call()
    except Exception as exc:
        return {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}
    return None


# --- SIGKILL at random points -------------------------------------------------------------

# Kills per test: at least MIN_KILLS, and more (up to MAX_KILLS) until MIN_MID_SAVE of them
# have landed mid-save and both adapters have been seen, which takes longer on a busy machine.
MIN_KILLS = 50
MAX_KILLS = 150
MIN_MID_SAVE = 15
# Range of the wait from fork to kill: a forked writer starts saving after about 10 ms and
# a save takes 4-10 ms here, so kills land at the first few saves, at random points.
KILL_DELAY_S = (0.01, 0.08)


def _child_save_forever(directory: str, variants: list[str]) -> None:
    for i in itertools.count():
        fastpeft.save_adapter(adapted(variants[i % 2]), directory)


def _adapter_state(directory: Path, variants: tuple[str, str]) -> str:
    """What ``directory`` holds after saves of ``variants`` (some of them killed or failed).

    First as a reader without fastpeft's lock and journal sees it (PEFT): every adapter file
    present is whole (byte-identical to the file a save of one of the variants writes), and
    the config and weights are of one variant; then ``fastpeft.load_adapter`` (which
    completes a save killed after its commit point) must load exactly one variant, after
    which the files on disk are that variant's and no journal is left (temp files of a save
    killed before its commit point stay until the next save).
    Returns the variant, or "<variant> (no-config)" when the raw directory lacked the config."""
    raw = {name: (directory / name).read_bytes() for name in ADAPTER_FILES if (directory / name).exists()}
    matching = [v for v in variants if all(raw[n] == reference_files(v)[n] for n in raw)]
    assert matching, f"the files {sorted(raw)} are not all of one of {variants} (truncated, foreign or mixed)"
    loaded = loaded_variant(directory, variants)
    assert {name: (directory / name).read_bytes() for name in ADAPTER_FILES} == reference_files(loaded)
    assert save_journal.JOURNAL_NAME not in entries(directory)
    return loaded if CONFIG in raw else f"{loaded} (no-config)"


@pytest.mark.parametrize("variants", [("a", "b"), ("a", "c")], ids=["same-config", "config-changes"])
def test_sigkill_at_random_points_leaves_old_or_new_adapter(zygote, tmp_path, variants):
    """A writer saving the two adapters in turn is killed at random times. After each kill
    fastpeft loads exactly one of the two adapters, whole (completing a save killed after
    its commit point); a reader without the journal sees whole files of one adapter, or,
    only when the config changes, no config. The next save removes the killed writer's temp
    files and touches nothing else."""
    first, second = variants
    target = tmp_path / "adapter"
    fastpeft.save_adapter(adapted(first), target)
    (target / "notes.txt").write_text("keep")
    rng = random.Random(1234)
    states: Counter[str] = Counter()
    mid_save = 0
    for kills in range(1, MAX_KILLS + 1):
        pid = zygote.fork("_child_save_forever", directory=str(target), variants=[second, first])
        time.sleep(rng.uniform(*KILL_DELAY_S))
        os.kill(pid, signal.SIGKILL)
        code, outcome = zygote.wait(pid)
        assert code == -signal.SIGKILL, outcome
        mid_save += bool(temp_files(target) or save_journal.JOURNAL_NAME in entries(target))
        states[_adapter_state(target, variants)] += 1
        fastpeft.save_adapter(adapted(first), target)
        assert entries(target) == sorted([*ADAPTER_FILES, "notes.txt"])
        assert (target / "notes.txt").read_text() == "keep"
        if kills >= MIN_KILLS and mid_save >= MIN_MID_SAVE and states[first] and states[second]:
            break
    assert mid_save >= MIN_MID_SAVE, f"only {mid_save} of {kills} kills landed mid-save"
    assert states[first] and states[second], states  # kills landed before and after commits
    same_config = VARIANTS[first][0] == VARIANTS[second][0]
    allowed = {first, second} if same_config else {first, second, f"{first} (no-config)", f"{second} (no-config)"}
    assert set(states) <= allowed, states


# --- concurrency and other files ------------------------------------------------------------


def _child_save(directory: str, variant: str, times: int) -> None:
    for _ in range(times):
        fastpeft.save_adapter(adapted(variant), directory)


def _wait_in_background(zygote: Zygote, pids: list[int]) -> tuple[threading.Event, list]:
    """Reap ``pids`` from a thread: returns an event set once all have exited, and the list
    their (exit code, outcome) pairs are appended to."""
    done, results = threading.Event(), []

    def wait_all() -> None:
        results.extend(zygote.wait(pid) for pid in pids)
        done.set()

    threading.Thread(target=wait_all, daemon=True).start()
    return done, results


def _watch_between_saves(target: Path, done: threading.Event) -> Counter[str]:
    """Until ``done``: take a shared flock on ``target`` (no save in progress then) and
    record the state of the adapter in it; the writers must be saving "a" and "c"."""
    seen: Counter[str] = Counter()
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while not done.wait(0.002):
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                seen[_adapter_state(target, ("a", "c"))] += 1
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        done.wait(60)  # let the writers finish before a failure ends the test
    return seen


def test_two_processes_saving_at_once_both_succeed(zygote, tmp_path):
    """Two processes save different adapters 30 times each into one directory. Both
    succeed, and a reader holding a shared flock on the directory (excluding saves in
    progress) only ever sees one of the two adapters, whole; so does the end state."""
    target = tmp_path / "adapter"
    fastpeft.save_adapter(adapted("a"), target)
    pids = [zygote.fork("_child_save", directory=str(target), variant=v, times=30) for v in ("a", "c")]
    done, results = _wait_in_background(zygote, pids)
    seen = _watch_between_saves(target, done)
    assert results == [(0, {"value": None})] * 2
    assert set(seen) <= {"a", "c"} and seen.total() >= 5, seen
    assert loaded_variant(target) in ("a", "c")
    assert entries(target) == ADAPTER_FILES


def test_two_threads_saving_at_once_both_succeed(tmp_path):
    """As for processes: the flock is per open of the directory, so threads exclude each other."""
    target = tmp_path / "adapter"
    fastpeft.save_adapter(adapted("a"), target)
    done, errors = threading.Event(), []

    def save(variant: str) -> None:
        try:
            _child_save(str(target), variant, times=20)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(v,)) for v in ("a", "c")]
    for thread in threads:
        thread.start()
    threading.Thread(target=lambda: ([t.join() for t in threads], done.set()), daemon=True).start()
    seen = _watch_between_saves(target, done)
    assert not errors
    assert set(seen) <= {"a", "c"} and seen.total() >= 5, seen
    assert entries(target) == ADAPTER_FILES


def _snapshot(directory: Path) -> dict[str, tuple]:
    """Identity and contents of every entry below ``directory``, symlinks not followed."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        data = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None
        out[str(path.relative_to(directory))] = (st.st_ino, st.st_mode, st.st_mtime_ns, data)
    return out


def test_other_files_are_never_touched(zygote, tmp_path):
    """50 saves in another process, while this one writes files into the directory: the
    files already there keep their inode, mode, mtime and contents, the new ones all stay,
    and a live process's temp file and an unrelated dot-file are left alone."""
    target = tmp_path / "adapter"
    fastpeft.save_adapter(adapted("a"), target)
    (target / "README.md").write_text("notes")
    (target / "trainer").mkdir()
    (target / "trainer" / "state.json").write_text("{}")
    (target / "latest").symlink_to("README.md")
    os.mkfifo(target / "pipe")  # cannot be copied, and reading it would block
    os.chmod(target / "README.md", 0o600)
    live_temp = safe_write.temp_name(WEIGHTS)  # this process's pid: a live writer
    (target / live_temp).write_bytes(b"in progress")
    (target / ".adapter_model.safetensors.tmp-backup").write_bytes(b"not ours")
    others = {k: v for k, v in _snapshot(target).items() if k not in ADAPTER_FILES}

    pid = zygote.fork("_child_save", directory=str(target), variant="c", times=50)
    done, results = _wait_in_background(zygote, [pid])
    written = []
    try:
        while not done.is_set():
            name = f"written-{len(written)}.txt"
            (target / name).write_text(name)
            written.append(name)
            time.sleep(0.001)
    finally:
        done.wait(60)  # reap the writer before a failure ends the test
    assert results == [(0, {"value": None})]
    assert len(written) > 5, "the saves finished before this process wrote anything"
    after = _snapshot(target)
    assert {k: after[k] for k in others} == others
    assert all((target / name).read_text() == name for name in written)
    assert set(after) == set(others) | set(written) | set(ADAPTER_FILES)
    assert loaded_variant(target) == "c"


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = _dead_pid()
    target = tmp_path / "adapter"
    target.mkdir()
    stale = [f".{name}.tmp-{dead}-{'0' * 16}" for name in ADAPTER_FILES]
    kept = [safe_write.temp_name(CONFIG), f".notes.txt.tmp-{dead}-{'0' * 16}"]
    for name in stale + kept:
        (target / name).write_bytes(b"partial")
    fastpeft.save_adapter(adapted("a"), target)
    assert entries(target) == sorted(ADAPTER_FILES + kept)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_without_directory_locks_saves_work_and_no_temp_file_is_removed(tmp_path, monkeypatch):
    """On a filesystem where flock fails (NFS gives EBADF), saves go ahead unserialized and
    leave other writers' temp files alone, since a dead pid here may be alive on another host."""
    def no_flock(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(safe_write.fcntl, "flock", no_flock)
    target = tmp_path / "adapter"
    target.mkdir()
    stale = f".{WEIGHTS}.tmp-{_dead_pid()}-{'0' * 16}"
    (target / stale).write_bytes(b"partial")
    fastpeft.save_adapter(adapted("a"), target)
    assert loaded_variant(target) == "a"
    assert entries(target) == sorted([stale, *ADAPTER_FILES])


def test_stale_pickle_weights_are_removed(tmp_path):
    """An old adapter_model.bin is shadowed by the new safetensors file (PEFT and fastpeft
    read safetensors first) and would be stale: the save removes it after the new files."""
    torch.save(adapter_state_dict(adapted("c")), tmp_path / "adapter_model.bin")
    fastpeft.save_adapter(adapted("a"), tmp_path)
    assert entries(tmp_path) == ADAPTER_FILES
    assert loaded_variant(tmp_path) == "a"


# --- errors before or during the save --------------------------------------------------------


def test_an_error_gathering_the_adapter_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no fastpeft adapter"):
        fastpeft.save_adapter(Stack(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    fastpeft.save_adapter(adapted("a"), tmp_path / "old")
    before = _snapshot(tmp_path / "old")
    with pytest.raises(ValueError, match="no fastpeft adapter"):
        fastpeft.save_adapter(Stack(), tmp_path / "old")
    assert _snapshot(tmp_path / "old") == before


def test_a_file_in_the_way_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        fastpeft.save_adapter(adapted("a"), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def _failing_on(monkeypatch, function: str, name: str, error: OSError) -> None:
    """Make ``os.<function>`` raise ``error`` when its destination (for fsync: any regular
    file) is ``name``."""
    original = getattr(os, function)

    def failing(*args, **kwargs):
        if function == "fsync" and Path(f"/proc/self/fd/{args[0]}").resolve().name.startswith(f".{name}.tmp-"):
            raise error
        if function == "replace" and args[1] == name:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(os, function, failing)


# (failing call, file it fails on, variant saved over "a", what fastpeft then loads). Staging
# (writing and fsyncing the temp files and the journal) comes before the commit point: the old
# adapter stays. A rename comes after it: the save is completed by the next fastpeft load.
FAILURES = {
    "weights-not-written": ("fsync", WEIGHTS, "b", "a"),
    "config-not-written": ("fsync", CONFIG, "c", "a"),
    "journal-not-written": ("fsync", save_journal.JOURNAL_NAME, "c", "a"),
    "journal-rename": ("replace", save_journal.JOURNAL_NAME, "c", "a"),
    "weights-rename-same-config": ("replace", WEIGHTS, "b", "b"),
    "weights-rename-config-changes": ("replace", WEIGHTS, "c", "c (no-config)"),
    "config-rename": ("replace", CONFIG, "c", "c (no-config)"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failing_save_raises_and_leaves_old_or_new_adapter(failure, tmp_path, monkeypatch):
    """An I/O error before the commit point leaves the old adapter and no temp file; one
    after it leaves the new adapter, completed by the next load (a reader without the
    journal sees no config meanwhile if the config changes). Other files are untouched."""
    function, name, variant, left = FAILURES[failure]
    fastpeft.save_adapter(adapted("a"), tmp_path)
    (tmp_path / "notes.txt").write_text("keep")
    _failing_on(monkeypatch, function, name, OSError(errno.EIO, "simulated I/O error"))
    with pytest.raises(OSError, match="simulated"):
        fastpeft.save_adapter(adapted(variant), tmp_path)
    monkeypatch.undo()
    if left == "a":
        assert not temp_files(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep"
    assert _adapter_state(tmp_path, ("a", variant)) == left
    fastpeft.save_adapter(adapted(variant), tmp_path)
    assert loaded_variant(tmp_path) == variant
    assert entries(tmp_path) == sorted([*ADAPTER_FILES, "notes.txt"])


# --- where the directory is -------------------------------------------------------------------


def test_resave_replaces_adapter_and_keeps_other_files(tmp_path):
    target = tmp_path / "adapter"
    fastpeft.save_adapter(adapted("a"), target)
    (target / "README.md").write_text("notes")
    fastpeft.save_adapter(adapted("c"), target)
    assert loaded_variant(target) == "c"
    assert entries(target) == sorted(["README.md", *ADAPTER_FILES])
    assert entries(tmp_path) == ["adapter"]


def test_symlinked_target_is_written_through(tmp_path):
    (tmp_path / "step-100").mkdir()
    (tmp_path / "latest").symlink_to("step-100")
    fastpeft.save_adapter(adapted("a"), tmp_path / "latest")
    fastpeft.save_adapter(adapted("c"), tmp_path / "latest")
    assert os.readlink(tmp_path / "latest") == "step-100"
    assert loaded_variant(tmp_path / "step-100") == "c"
    assert entries(tmp_path) == ["latest", "step-100"]


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fastpeft.save_adapter(adapted("a"), ".")
    fastpeft.save_adapter(adapted("c"), ".")
    assert os.path.samefile(os.getcwd(), tmp_path) and os.listdir(".") == os.listdir(tmp_path)
    assert loaded_variant(tmp_path) == "c"


def test_path_with_dotdot(tmp_path):
    fastpeft.save_adapter(adapted("a"), tmp_path / "a" / "b" / "..")
    assert loaded_variant(tmp_path / "a") == "a"
    assert entries(tmp_path / "a") == sorted(["b", *ADAPTER_FILES])


def test_load_adapter_path_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'}.* is not a directory"):
        fastpeft.load_adapter(Stack(), tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastpeft.load_adapter(Stack(), tmp_path / "missing")


# --- permissions -----------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o002, 0o664, 0o775), (0o022, 0o644, 0o755)],
                         ids=["umask-002", "umask-022"])
def test_modes_follow_umask_and_setgid_group(tmp_path, umask, file_mode, dir_mode):
    """As with mkdir and open(..., "w"): new files 0o666 and the directory 0o777 less the
    umask, the group (and setgid bit) of a setgid parent inherited, on a first save and a resave."""
    group = pwd.getpwnam("nobody").pw_gid if os.geteuid() == 0 else os.getgid()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, -1, group)
    os.chmod(shared, 0o2775)
    old = os.umask(umask)
    try:
        for variant in ("a", "c"):
            fastpeft.save_adapter(adapted(variant), shared / "adapter")
    finally:
        os.umask(old)
    target = shared / "adapter"
    assert _mode(target) == 0o2000 | dir_mode and target.stat().st_gid == group
    for name in ADAPTER_FILES:
        assert _mode(target / name) == file_mode and (target / name).stat().st_gid == group, name


@pytest.fixture
def world_dir():
    """A directory that an unprivileged user can reach (pytest's tmp_path is root-only)."""
    with reachable_temp_dir("fastpeft-save-") as path:
        yield path


def _child_unprivileged_saves(root: str) -> dict:
    """As "nobody" (when run as root): save over an adapter in a read-only directory, and
    into a writable directory whose parent is read-only."""
    run_as_nobody_if_root()
    return {
        name: _error_of(lambda: fastpeft.save_adapter(adapted("c"), Path(root, *path)))
        for name, path in [("read-only-target", ["ro-target"]), ("read-only-parent", ["ro-parent", "adapter"])]
    }


def _owned_adapter_dir(path: Path, mode: int) -> None:
    """An adapter "a" in ``path``, owned by nobody when running as root, with ``mode``."""
    fastpeft.save_adapter(adapted("a"), path)
    give_to_nobody_if_root(path, *path.iterdir())
    path.chmod(mode)


def test_permissions_of_an_unprivileged_user(zygote, world_dir):
    """Without write permission on the directory: PermissionError naming it, nothing
    changed. With write permission on the directory but not its parent: the save works."""
    _owned_adapter_dir(world_dir / "ro-target", 0o555)
    (world_dir / "ro-parent").mkdir()
    _owned_adapter_dir(world_dir / "ro-parent" / "adapter", 0o755)
    (world_dir / "ro-parent").chmod(0o555)
    before = _snapshot(world_dir / "ro-target")
    errors = zygote.run("_child_unprivileged_saves", root=str(world_dir))
    assert errors["read-only-target"] == {
        "error": "PermissionError", "errno": errno.EACCES,
        "message": f"[Errno 13] cannot write into {str(world_dir / 'ro-target')!r}: Permission denied",
    }
    assert _snapshot(world_dir / "ro-target") == before
    assert errors["read-only-parent"] is None
    assert loaded_variant(world_dir / "ro-parent" / "adapter") == "c"
    assert entries(world_dir / "ro-parent") == ["adapter"]


# --- mount points and read-only filesystems, in a private mount namespace ----------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
# Flags of unshare(2) and mount(2), from <sched.h> and <sys/mount.h>.
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_REC = 16384
MS_PRIVATE = 1 << 18


def _mount(target: str, flags: int = 0, fstype: str | None = "tmpfs") -> None:
    """mount(2) (a tmpfs by default); NamespaceUnavailable if this machine does not allow it."""
    if _LIBC.mount(b"none", os.fsencode(target), fstype and fstype.encode(), flags, None) != 0:
        err = ctypes.get_errno()
        raise NamespaceUnavailable(f"cannot mount {fstype or 'with flags ' + hex(flags)} on {target} here: "
                                   f"{os.strerror(err)}")


def _enter_private_mount_namespace() -> None:
    """Move this (single-threaded, forked) process into a new mount namespace whose mounts
    do not propagate to the host, like ``unshare -m`` (as root) or ``unshare -rm``."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS if os.geteuid() == 0 else CLONE_NEWNS | CLONE_NEWUSER
    if _LIBC.unshare(flags) != 0:
        raise NamespaceUnavailable(f"cannot make a private mount namespace here: {os.strerror(ctypes.get_errno())}")
    if flags & CLONE_NEWUSER:
        try:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
        except OSError as exc:
            raise NamespaceUnavailable(f"cannot map this user into a user namespace here: {exc}") from exc
    _mount("/", MS_REC | MS_PRIVATE, fstype=None)  # before any mount: none may reach the host


def _child_mount_point(directory: str) -> dict:
    """Saves into a directory that is a mount point, with a file of its own."""
    _enter_private_mount_namespace()
    _mount(directory)
    Path(directory, "keep.txt").write_text("keep")
    fastpeft.save_adapter(adapted("a"), directory)
    fastpeft.save_adapter(adapted("c"), directory)
    return {"mount": os.path.ismount(directory), "entries": entries(Path(directory)),
            "keep": Path(directory, "keep.txt").read_text(), "loads": loaded_variant(directory)}


def test_mount_point_target(zygote, tmp_path):
    target = tmp_path / "volume"
    target.mkdir()
    assert zygote.run("_child_mount_point", directory=str(target)) == {
        "mount": True, "entries": sorted(["keep.txt", *ADAPTER_FILES]), "keep": "keep", "loads": "c",
    }
    assert entries(target) == []  # the mount was private to the child


def _child_read_only_filesystem(directory: str) -> dict:
    """A save over adapter "a" on a filesystem remounted read-only."""
    _enter_private_mount_namespace()
    _mount(directory)
    fastpeft.save_adapter(adapted("a"), directory)
    _mount(directory, MS_REMOUNT | MS_RDONLY)
    return {"error": _error_of(lambda: fastpeft.save_adapter(adapted("c"), directory)),
            "entries": entries(Path(directory)), "loads": loaded_variant(directory)}


def test_read_only_filesystem_raises_permission_error(zygote, tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    assert zygote.run("_child_read_only_filesystem", directory=str(target)) == {
        "error": {"error": "PermissionError", "errno": errno.EROFS,
                  "message": f"[Errno 30] cannot write into {str(target)!r}: Read-only file system"},
        "entries": ADAPTER_FILES, "loads": "a",
    }


def _child_read_only_parent(parent: str) -> dict:
    """Saves into a writable filesystem mounted on a directory of a read-only one."""
    _enter_private_mount_namespace()
    _mount(parent)
    target = Path(parent, "adapter")
    target.mkdir()
    _mount(str(target))
    _mount(parent, MS_REMOUNT | MS_RDONLY)
    parent_writable = _error_of(lambda: Path(parent, "probe").write_text("x")) is None
    fastpeft.save_adapter(adapted("a"), target)
    fastpeft.save_adapter(adapted("c"), target)
    return {"parent writable": parent_writable, "entries": entries(target), "loads": loaded_variant(target)}


def test_read_only_parent_with_writable_target(zygote, tmp_path):
    assert zygote.run("_child_read_only_parent", parent=str(tmp_path)) == {
        "parent writable": False, "entries": ADAPTER_FILES, "loads": "c",
    }


# --- durability: what is fsynced, and when ---------------------------------------------------


def _record_calls(monkeypatch) -> list[tuple[str, str]]:
    """Record ``os.fsync`` (as the path of the synced file or directory), ``os.replace`` and
    ``os.unlink`` (as the name they change) in order."""
    calls: list[tuple[str, str]] = []
    for name in ("fsync", "replace", "unlink"):
        original = getattr(os, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            what = os.readlink(f"/proc/self/fd/{args[0]}") if _name == "fsync" else os.fsdecode(args[1 if _name ==
                                                                                                      "replace" else 0])
            calls.append((_name, what))
            return _original(*args, **kwargs)

        monkeypatch.setattr(os, name, recorded)
    return calls


def test_directory_and_new_parents_are_fsynced_after_the_renames(tmp_path, monkeypatch):
    """A save into a new directory a/b/adapter, and one over an adapter whose config
    changes: each new directory's entry is synced in its parent; every file is synced in
    its temp file before the commit point; the journal's rename (the commit point) is
    synced before the first file is renamed; the renames and the journal's removal are
    synced before the save returns."""
    fastpeft.save_adapter(adapted("c"), tmp_path / "old")
    target = tmp_path / "a" / "b" / "adapter"
    for directory in (target, tmp_path / "old"):
        calls = _record_calls(monkeypatch)
        fastpeft.save_adapter(adapted("a"), directory)
        monkeypatch.undo()
        syncs = [what for call, what in calls if call == "fsync"]
        if directory == target:
            for new in (target, target.parent, target.parent.parent):
                assert str(new.parent) in syncs, f"{new}'s entry is not synced in its parent"
        commit = calls.index(("replace", save_journal.JOURNAL_NAME))
        staged = {Path(what).name.split(".tmp-")[0] for what in syncs[:commit] if ".tmp-" in what}
        assert staged == {f".{name}" for name in [*ADAPTER_FILES, save_journal.JOURNAL_NAME]}, staged
        first_rename = next(i for i, (call, _) in enumerate(calls) if call == "replace" and i > commit)
        assert ("fsync", str(directory)) in calls[commit:first_rename], "the commit point is not synced"
        renamed = [what for call, what in calls[commit + 1:] if call == "replace"]
        assert renamed == [WEIGHTS, CONFIG], renamed  # the config last
        last_change = max(i for i, (call, _) in enumerate(calls) if call in ("replace", "unlink"))
        assert calls[last_change] == ("unlink", save_journal.JOURNAL_NAME)
        assert ("fsync", str(directory)) in calls[calls.index(("replace", CONFIG)):last_change]
        assert ("fsync", str(directory)) in calls[last_change:], "the journal's removal is not synced"


def _child_journal_on_read_only_filesystem(directory: str) -> dict:
    """A save of "c" over "a" that fails after its commit point (its journal stays), then the
    filesystem remounted read-only: loads read the committed save through the journal."""
    _enter_private_mount_namespace()
    _mount(directory)
    fastpeft.save_adapter(adapted("a"), directory)
    original = os.replace

    def failing(src, dst, **kwargs):
        if dst == WEIGHTS:
            raise OSError(errno.EIO, "simulated I/O error")
        return original(src, dst, **kwargs)

    os.replace = failing
    error = _error_of(lambda: fastpeft.save_adapter(adapted("c"), directory))
    os.replace = original
    _mount(directory, MS_REMOUNT | MS_RDONLY)
    before = entries(Path(directory))
    return {"error": error and error["message"], "journal": save_journal.JOURNAL_NAME in before,
            "loads": loaded_variant(directory), "unchanged": entries(Path(directory)) == before}


def test_a_killed_save_on_a_read_only_filesystem_is_read_through_its_journal(zygote, tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    assert zygote.run("_child_journal_on_read_only_filesystem", directory=str(target)) == {
        "error": "[Errno 5] simulated I/O error", "journal": True, "loads": "c", "unchanged": True,
    }
