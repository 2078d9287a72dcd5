"""Every dotted ``fastpeft...`` name in the package's sources (docstrings, comments), its data
files and the README resolves to a module or an attribute of one, so a module moved or a
function renamed cannot leave a docstring naming what is gone. ``torch.ops.fastpeft.<op>``
names resolve among the registered ops; ``fastpeft._C``, the optional CUDA extension, is
taken as named by ``fastpeft.cuda_ext``."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

import fastpeft
from fastpeft import cuda_ext

REPO = Path(__file__).resolve().parent.parent
# A dotted name starting with the package, and what precedes it (to tell torch.ops names apart).
REFERENCE = re.compile(r"(?P<before>[\w.]*?)\bfastpeft(?P<rest>(?:\.[A-Za-z_]\w*)+)")
FILES = sorted([*(REPO / "fastpeft").rglob("*.py"), *(REPO / "fastpeft").rglob("*.json"), REPO / "README.md"])


def _resolves(name: str) -> bool:
    parts = name.split(".")
    if name == cuda_ext.EXTENSION_MODULE or name.startswith(cuda_ext.EXTENSION_MODULE + "."):
        return True
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def _references() -> list[tuple[str, str, str]]:
    """``(what precedes the name, the name, file:line)`` of every dotted name in ``FILES``."""
    found = []
    for path in FILES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in REFERENCE.finditer(line):
                name = "fastpeft" + match["rest"].rstrip(".")
                found.append((match["before"], name, f"{path.relative_to(REPO)}:{number}"))
    return found


def test_every_dotted_fastpeft_name_resolves():
    fastpeft.ops  # noqa: B018 - registers the ops
    unresolved = []
    references = _references()
    assert len(references) > 100, "the scan found almost nothing: the pattern is broken"
    for before, name, where in references:
        if before.endswith("torch.ops."):
            ok = hasattr(torch.ops.fastpeft, name.split(".")[1])
        else:
            ok = _resolves(name)
        if not ok:
            unresolved.append(f"{where}: {name}")
    assert not unresolved, "names that no longer exist:\n" + "\n".join(unresolved)


def test_the_check_finds_a_stale_name():
    assert not _resolves("fastpeft.kernels.lora.launch.no_such_function")
    assert not _resolves("fastpeft.no_such_module")
    assert _resolves("fastpeft.kernels.lora.launch.lora_backward")
