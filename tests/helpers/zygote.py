"""A server process that forks children running a test module's ``_child_*`` functions.

Tests that need many other processes (a writer killed at random moments, concurrent
savers, a reader against a writer) fork them from one server, the "zygote": it imports the
test module (torch, fastpeft, transformers) once and prepares its models
(``zygote_warm()``, if the module has one); a fresh interpreter would take seconds per child.

Protocol: one JSON line per request on the zygote's stdin, one JSON reply line on its
stdout: ``{"op": "fork", "fn": name, "kwargs": {...}}`` forks a child running
``module.name(**kwargs)`` and replies its pid; ``{"op": "wait", "pid": pid}`` reaps it and
replies its exit code and what the function returned or raised.

Permission tests run their children as an unprivileged user: as root, which ignores permission
bits, a child becomes "nobody" (``run_as_nobody_if_root``) and works in a directory it can reach
(``reachable_temp_dir``), on files given to it (``give_to_nobody_if_root``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class NamespaceUnavailable(Exception):
    """This machine does not let the test make a private mount namespace or mount tmpfs."""


class ChildFailed(AssertionError):
    pass


def main(module_name: str) -> None:
    """The zygote's loop (run in its own interpreter)."""
    import torch

    torch.set_num_threads(1)  # no thread pool that a forked child would inherit broken
    module = importlib.import_module(module_name)
    getattr(module, "zygote_warm", lambda: None)()
    results: dict[int, int] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "fork":
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                _run_child(module, write, request["fn"], request["kwargs"])
            os.close(write)
            results[pid] = read
            reply = {"pid": pid}
        else:
            _, status = os.waitpid(request["pid"], 0)
            with os.fdopen(results.pop(request["pid"]), "rb") as f:
                data = f.read()
            reply = {"code": os.waitstatus_to_exitcode(status), "result": json.loads(data) if data else None}
        print(json.dumps(reply), flush=True)


def _run_child(module, result_fd: int, fn: str, kwargs: dict) -> None:
    """In a forked child: run ``fn``, write its outcome to ``result_fd`` as JSON and exit."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)  # the zygote's request stream and reply stream are not ours
        os.dup2(2, 1)
        assert fn.startswith("_child_")
        outcome = {"value": getattr(module, fn)(**kwargs)}
    except BaseException as exc:
        outcome = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc),
                   "traceback": traceback.format_exc()}
    finally:
        try:
            os.write(result_fd, json.dumps(outcome).encode())
        finally:
            os._exit(0)


class Zygote:
    """The test process's handle on a zygote serving ``module_name``."""

    def __init__(self, module_name: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from tests.helpers.zygote import main; main({module_name!r})"],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited (code {self.process.wait()})")
        return json.loads(line)

    def fork(self, fn: str, **kwargs) -> int:
        return self._ask({"op": "fork", "fn": fn, "kwargs": kwargs})["pid"]

    def wait(self, pid: int) -> tuple[int, dict | None]:
        """The child's exit code (-signal if killed) and outcome (None if it was killed)."""
        reply = self._ask({"op": "wait", "pid": pid})
        return reply["code"], reply["result"]

    def run(self, fn: str, **kwargs):
        """Run ``fn`` in a child; return its value, skip if it raised NamespaceUnavailable,
        fail with its traceback if it raised anything else."""
        code, outcome = self.wait(self.fork(fn, **kwargs))
        if outcome is None:
            raise ChildFailed(f"{fn} died with exit code {code}")
        if outcome.get("error") == NamespaceUnavailable.__name__:
            pytest.skip(outcome["message"])
        if "error" in outcome:
            raise ChildFailed(outcome["traceback"])
        return outcome["value"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def run_as_nobody_if_root() -> None:
    """In a forked child: when running as root, become "nobody" (its group, no supplementary
    groups), so that permission bits apply as to an unprivileged user; nothing otherwise."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)


def give_to_nobody_if_root(*paths: Path) -> None:
    """When running as root, make "nobody" the owner of ``paths`` (what ``run_as_nobody_if_root``'s
    child is to own); nothing otherwise."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)


@contextlib.contextmanager
def reachable_temp_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory an unprivileged user can reach (pytest's tmp_path is root-only),
    removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)
