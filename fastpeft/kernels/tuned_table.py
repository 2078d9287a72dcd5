"""The per-device table of validated, timed kernels ``fastpeft tune`` writes
(``fastpeft.tune``), and the choice ``FASTPEFT_BACKEND=auto`` reads from it on a CUDA device.

Where: ``$FASTPEFT_TUNE_DIR``, else ``$XDG_CACHE_HOME/fastpeft``, else ``~/.cache/fastpeft``;
one file per GPU, ``tuned-<device slug>.json`` (``table_path``). A table is used only on the
device and software it was made with (``fingerprint``: GPU name, SM count, compute
capability, NVIDIA driver, torch, Triton and fastpeft versions, all equal); a table for this
GPU made with other versions is ignored with a one-line warning that suggests running
``fastpeft tune`` again. Without a table, ``auto`` is unchanged.

Format (``SCHEMA``): ``{"schema", "device": fingerprint, "entries": [...]}``, each entry
``{"device", "op", "mode", "dtype", "M", "K", "N", "r", "implementation", "max_rel_error",
"passed", "median_us", "spread_us"}``: ``op`` one of ``OPS``; ``mode`` ``"inference"`` (a
forward), ``"training"`` (forward and backward, the pair a training step runs, without
dropout) or ``"training_dropout"`` (the same with dropout); ``dtype``
torch's name of the activation dtype; ``M`` rows, ``K`` -> ``N`` the layer (for the bottleneck
adapter K = N = D and ``r`` its R), ``r`` the rank; ``implementation`` one of the op's
implementations (LoRA: ``fastpeft.kernels.lora.dispatch.IMPLEMENTATIONS``), the torch path
``"torch"`` included; ``passed`` whether it matched float64 on that GPU in every check of the
tuning run (``max_rel_error``: the largest per-row relative error over the outputs and
gradients checked at this shape, null when not finite); ``median_us`` and ``spread_us``
(``[low, high]``, the interquartile range of its timed calls) its time.

Choice (``choose``): the measured shape nearest the problem (in octaves, summed over M, K,
N and r); there, the fastest implementation that passed, if its whole spread lies below the
torch path's (``high < torch's low``); else the torch path -- also where the torch path was not
timed at that shape, or nothing passed. Files are read only when regular, at most
``MAX_TABLE_BYTES``, and parsed as JSON (no pickle); a malformed table is ignored with a
warning naming what is wrong, never half used.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastpeft._version import __version__
from fastpeft.backend import triton_available

SCHEMA = "fastpeft-tuned/1"
# Ops a table can decide.
OPS = ("lora", "bottleneck", "multi_lora")
# "training": a forward and backward without dropout (PEFT's default lora_dropout = 0, where the
# forward may fuse the shrink into the GEMM), "training_dropout" with it (the mask drawn in the
# forward, redrawn in the backward): the kernels differ, so the tables keep them apart.
INFERENCE, TRAINING, TRAINING_DROPOUT = "inference", "training", "training_dropout"
MODES = (INFERENCE, TRAINING, TRAINING_DROPOUT)
TORCH = "torch"
# A table holds a few hundred entries (~300 bytes each); 16 MB bounds what a bad file costs.
MAX_TABLE_BYTES = 16 * 1024 * 1024
ENV_DIR = "FASTPEFT_TUNE_DIR"
# The NVIDIA driver's version, as Linux's driver reports it (no subprocess, no NVML).
_DRIVER_FILE = Path("/proc/driver/nvidia/version")
_DRIVER_RE = re.compile(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)")
_ENTRY_KEYS = {"device", "op", "mode", "dtype", "M", "K", "N", "r", "implementation", "max_rel_error", "passed",
               "median_us", "spread_us"}


def tune_dir() -> Path:
    """The directory of tuned tables (read at every call, like the backend variable)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fastpeft"


def driver_version() -> str:
    """The NVIDIA driver's version, or ``"unknown"`` where the system does not say."""
    try:
        text = _read_regular(_DRIVER_FILE, 4096).decode(errors="replace")
    except (OSError, ValueError):
        return "unknown"
    found = _DRIVER_RE.search(text)
    return found.group(1) if found else "unknown"


def _triton_version() -> str:
    if not triton_available():
        return "none"
    import triton

    return triton.__version__


def device_fingerprint(gpu: str, sms: int, capability: str) -> dict[str, Any]:
    """A fingerprint: the device's name, SM count and capability, with this machine's NVIDIA
    driver and torch, Triton and fastpeft versions."""
    return {"gpu": gpu, "sms": sms, "capability": capability, "driver": driver_version(),
            "torch": torch.__version__, "triton": _triton_version(), "fastpeft": __version__}


def fingerprint(index: int) -> dict[str, Any]:
    """What a table must have been made on to be used on CUDA device ``index``."""
    return json.loads(_fingerprint_json(index))


@functools.cache
def _fingerprint_json(index: int) -> str:
    """``fingerprint(index)`` as sorted JSON (the form tables are compared in), once per device."""
    props = torch.cuda.get_device_properties(index)
    return json.dumps(device_fingerprint(props.name, props.multi_processor_count, f"sm_{props.major}{props.minor}"),
                      sort_keys=True)


@functools.cache
def _file_name(fingerprint_json: str) -> str:
    """The table's file name for a fingerprint (``table_path``'s), parsed once per device: the
    op asks ``table_for`` at every call."""
    return table_path(json.loads(fingerprint_json), Path()).name


def device_slug(device: Mapping[str, Any]) -> str:
    """The file-name part for a fingerprint: its GPU name and capability, lower-case words."""
    words = re.sub(r"[^a-z0-9]+", "-", f"{device['gpu']} {device['capability']}".lower()).strip("-")
    return words or "gpu"


def table_path(device: Mapping[str, Any], directory: Path | None = None) -> Path:
    """Where the table of ``device`` (a fingerprint) lives."""
    return (directory or tune_dir()) / f"tuned-{device_slug(device)}.json"


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of regular file ``path`` (symlinks followed), ValueError if it is anything
    else or larger than ``limit``."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path} is {info.st_size} bytes, over the {limit}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{path} grew past the {limit}-byte limit while read")
        return data
    finally:
        os.close(fd)


def validate_table(table: Any) -> dict:
    """``table`` if it follows ``SCHEMA`` (module docstring), else ValueError saying what is wrong."""
    if not isinstance(table, dict) or table.get("schema") != SCHEMA:
        raise ValueError(f"a tuned table must be a JSON object with schema {SCHEMA!r}")
    if not isinstance(table.get("device"), dict) or not isinstance(table.get("entries"), list):
        raise ValueError("a tuned table needs a 'device' object and a list of 'entries'")
    for i, e in enumerate(table["entries"]):
        where = f"tuned table entry {i}"
        if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
            raise ValueError(f"{where}: expected exactly the keys {sorted(_ENTRY_KEYS)}")
        if e["op"] not in OPS or e["mode"] not in MODES:
            raise ValueError(f"{where}: op must be one of {OPS} and mode one of {MODES}")
        if not all(isinstance(e[k], int) and not isinstance(e[k], bool) and e[k] >= 1 for k in ("M", "K", "N", "r")):
            raise ValueError(f"{where}: M, K, N and r must be integers >= 1")
        if not (isinstance(e["implementation"], str) and isinstance(e["dtype"], str) and isinstance(e["passed"], bool)):
            raise ValueError(f"{where}: implementation and dtype must be strings, passed a boolean")
        err = e["max_rel_error"]
        if err is not None and not (_positive(err) or err == 0):
            raise ValueError(f"{where}: max_rel_error must be a finite number >= 0, or null")
        spread = e["spread_us"]
        if not (_positive(e["median_us"]) and isinstance(spread, list) and len(spread) == 2
                and all(_positive(v) for v in spread) and spread[0] <= e["median_us"] <= spread[1]):
            raise ValueError(f"{where}: median_us must be a positive time within spread_us [low, high]")
    return table


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class _Loaded:
    """A table read from disk: usable (``table``), or the reason it is not (``problem``)."""

    table: dict | None
    problem: str | None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int, device_json: str) -> _Loaded:
    """The table at ``path`` (as it was at ``mtime_ns`` / ``size``: a rewritten file is read
    again) if it is valid and made on the fingerprint ``device_json``."""
    del mtime_ns, size  # the cache key only
    try:
        table = validate_table(json.loads(_read_regular(Path(path), MAX_TABLE_BYTES)))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return _Loaded(None, f"ignoring the tuned table {path}: {exc}")
    device = json.loads(device_json)
    if table["device"] != device:
        differ = sorted(k for k in set(device) | set(table["device"]) if table["device"].get(k) != device.get(k))
        return _Loaded(None, f"ignoring the tuned table {path}: it was made with other {', '.join(differ)} "
                             f"than this machine's; run `fastpeft tune` to make one for it")
    return _Loaded(table, None)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def table_for(device: torch.device) -> dict | None:
    """The tuned table of CUDA ``device`` made on its fingerprint, or None: no table (a
    one-line notice, once, when the directory has tables for other GPUs), or one made with
    other versions, or malformed (a one-line warning, once)."""
    if not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    fp_json = _fingerprint_json(index)
    path = tune_dir() / _file_name(fp_json)
    try:
        info = path.stat()
    except OSError:
        _notice_other_tables(str(path.parent), path.name)
        return None
    loaded = _load(str(path), info.st_mtime_ns, info.st_size, fp_json)
    if loaded.problem:
        _warn_once(loaded.problem)
    return loaded.table


@functools.cache
def _notice_other_tables(directory: str, name: str) -> None:
    """Warn once when ``directory`` holds tuned tables but none named ``name`` (this GPU's)."""
    try:
        others = sorted(p.name for p in Path(directory).glob("tuned-*.json"))
    except OSError:
        return
    if others:
        _warn_once(f"the tuned tables in {directory} ({', '.join(others)}) are for other GPUs, not {name}; "
                   f"run `fastpeft tune` to make one for this GPU")


def mode_of(training: bool, dropout: bool) -> str:
    """The table's mode of a call: an inference forward, or either pass of a training step
    without or with dropout. A call with dropout is a training step's even without a backward
    (reentrant activation checkpointing runs its first forward under no_grad): its forward and
    the recomputation then pick the same implementation, so they draw the same mask."""
    if dropout:
        return TRAINING_DROPOUT
    return TRAINING if training else INFERENCE


def tuned_choice(device: torch.device, op: str, mode: str, dtype: torch.dtype, m: int, k: int, n: int,
                 r: int, excluded: Collection[str] = ()) -> str | None:
    """What the tuned table of CUDA ``device`` picks for the problem (``choose``), or None:
    no usable table (``table_for``), or none of its entries is for ``op``, ``mode`` and
    ``dtype`` -- the op then decides as it does without a table."""
    table = table_for(device)
    return None if table is None else choose(table, op, mode, dtype, m, k, n, r, excluded)


def _octaves(a: int, b: int) -> float:
    return abs(math.log2(a / b))


def choose(table: Mapping[str, Any], op: str, mode: str, dtype: torch.dtype | str, m: int, k: int, n: int,
           r: int, excluded: Collection[str] = ()) -> str | None:
    """The implementation ``table`` picks for ``op`` in ``mode`` on ``dtype`` activations at
    M rows, K -> N and rank r (module docstring), or None when the table has no entry for
    that op, mode and dtype. ``excluded``: implementations that cannot run this problem
    (multi-LoRA's CUDA C++ decode kernel above decode sizes), never picked."""
    dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    entries = [e for e in table["entries"] if (e["op"], e["mode"], e["dtype"]) == (op, mode, dtype)]
    if not entries:
        return None
    shape = min(((e["M"], e["K"], e["N"], e["r"]) for e in entries),
                key=lambda s: _octaves(m, s[0]) + _octaves(k, s[1]) + _octaves(n, s[2]) + _octaves(r, s[3]))
    here = [e for e in entries if (e["M"], e["K"], e["N"], e["r"]) == shape]
    torch_low = min((e["spread_us"][0] for e in here if e["implementation"] == TORCH and e["passed"]), default=None)
    passed = [e for e in here if e["passed"] and e["implementation"] != TORCH and e["implementation"] not in excluded]
    if torch_low is None or not passed:
        return TORCH
    best = min(passed, key=lambda e: e["median_us"])
    return best["implementation"] if best["spread_us"][1] < torch_low else TORCH
