"""The per-device tuned table (fastpeft.kernels.tuned_table) and ``auto`` following it: the
choice per shape (only what passed, only beyond the torch path's spread, the nearest measured
shape), the file's checks (schema, regular file, size cap, made on this device and these
versions), and the LoRA dispatch under ``FASTPEFT_BACKEND=auto`` on a mocked CUDA device."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastpeft import backend
from fastpeft.kernels import tuned_table
from fastpeft.kernels.tuned_table import SCHEMA, choose, validate_table

DEVICE = {"gpu": "NVIDIA H100 80GB HBM3", "sms": 132, "capability": "sm_90", "driver": "560.35.03",
          "torch": "2.9.0+cu128", "triton": "3.6.0", "fastpeft": "0.1.0"}


def _entry(impl: str, median: float, m: int = 4096, passed: bool = True, spread: float = 0.02, k: int = 4096,
           n: int = 4096, r: int = 16, mode: str = "training", dtype: str = "bfloat16", op: str = "lora") -> dict:
    return {"device": DEVICE["gpu"], "op": op, "mode": mode, "dtype": dtype, "M": m, "K": k, "N": n, "r": r,
            "implementation": impl, "max_rel_error": 1e-3 if passed else 0.5, "passed": passed,
            "median_us": median, "spread_us": [median * (1 - spread), median * (1 + spread)]}


def _table(*entries: dict) -> dict:
    return {"schema": SCHEMA, "device": DEVICE, "entries": list(entries)}


def test_the_fastest_implementation_that_passed_wins_beyond_the_torch_spread():
    table = _table(_entry("torch", 100.0), _entry("fused", 80.0), _entry("hybrid", 90.0))
    assert choose(table, "lora", "training", torch.bfloat16, 4096, 4096, 4096, 16) == "fused"
    # fused failed validation there: the next fastest that passed
    table = _table(_entry("torch", 100.0), _entry("fused", 80.0, passed=False), _entry("hybrid", 90.0))
    assert choose(table, "lora", "training", "bfloat16", 4096, 4096, 4096, 16) == "hybrid"
    # an implementation that cannot run the problem is never picked: the next fastest
    table = _table(_entry("torch", 100.0), _entry("fused", 80.0), _entry("hybrid", 90.0))
    assert choose(table, "lora", "training", "bfloat16", 4096, 4096, 4096, 16, excluded=("fused",)) == "hybrid"


@pytest.mark.parametrize("entries", [
    (_entry("torch", 100.0, spread=0.05), _entry("fused", 97.0, spread=0.05)),  # within the spreads
    (_entry("torch", 100.0), _entry("fused", 80.0, passed=False)),  # faster, but failed
    (_entry("fused", 80.0), _entry("hybrid", 90.0)),  # the torch path not timed there
])
def test_otherwise_the_torch_path(entries):
    assert choose(_table(*entries), "lora", "training", "bfloat16", 4096, 4096, 4096, 16) == "torch"


def test_the_nearest_measured_shape_decides_and_other_keys_do_not_match():
    table = _table(_entry("torch", 10.0, m=16), _entry("fused", 5.0, m=16),
                   _entry("torch", 100.0, m=4096), _entry("hybrid", 80.0, m=4096))
    assert choose(table, "lora", "training", "bfloat16", 1, 4096, 4096, 16) == "fused"
    assert choose(table, "lora", "training", "bfloat16", 200, 4096, 4096, 16) == "fused"  # 3.6 octaves from 16
    assert choose(table, "lora", "training", "bfloat16", 300, 4096, 4096, 16) == "hybrid"  # 3.8 from 4096
    assert choose(table, "lora", "training", "bfloat16", 16, 4096, 4096, 64) == "fused"  # r nearer than M
    for other in (("lora", "inference", "bfloat16"), ("lora", "training", "float16"), ("bottleneck", "training",
                                                                                       "bfloat16")):
        assert choose(table, other[0], other[1], other[2], 16, 4096, 4096, 16) is None


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.update(schema="other/1"), "schema"),
    (lambda t: t.pop("device"), "'device'"),
    (lambda t: t["entries"][0].pop("passed"), "keys"),
    (lambda t: t["entries"][0].update(op="dora"), "op must be"),
    (lambda t: t["entries"][0].update(M=True), "integers"),
    (lambda t: t["entries"][0].update(K=0), "integers"),
    (lambda t: t["entries"][0].update(passed="yes"), "boolean"),
    (lambda t: t["entries"][0].update(median_us=200.0), "within spread_us"),
    (lambda t: t["entries"][0].update(spread_us=[1.0]), "within spread_us"),
    (lambda t: t["entries"][0].update(median_us=float("nan")), "positive"),
    (lambda t: t["entries"][0].update(max_rel_error=-1.0), "max_rel_error"),
    (lambda t: t["entries"][0].update(max_rel_error="0.1"), "max_rel_error"),
])
def test_malformed_tables_are_rejected(mutate, message):
    table = _table(_entry("torch", 100.0))
    mutate(table)
    with pytest.raises(ValueError, match=message):
        validate_table(table)


@pytest.fixture
def on_mocked_gpu(monkeypatch, tmp_path):
    """CUDA device 0 is an H100 with the fingerprint DEVICE; tables live in tmp_path; the
    caches and once-only warnings start empty."""
    monkeypatch.setenv(tuned_table.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tuned_table, "_fingerprint_json", lambda index: json.dumps(DEVICE, sort_keys=True))
    for cached in (tuned_table._load, tuned_table._warn_once, tuned_table._notice_other_tables):
        cached.cache_clear()
    yield tmp_path
    for cached in (tuned_table._load, tuned_table._warn_once, tuned_table._notice_other_tables):
        cached.cache_clear()


def _write(path, table) -> None:
    path.write_text(json.dumps(table))


def test_the_table_of_this_device_is_read_and_a_rewrite_is_seen(on_mocked_gpu):
    cuda = torch.device("cuda")
    path = tuned_table.table_path(DEVICE)
    assert path == on_mocked_gpu / "tuned-nvidia-h100-80gb-hbm3-sm-90.json"
    assert tuned_table.table_for(cuda) is None  # no table, no other tables: silent
    table = _table(_entry("torch", 100.0), _entry("fused", 80.0))
    _write(path, table)
    assert tuned_table.table_for(cuda) == table
    table["entries"][1]["median_us"] = table["entries"][1]["spread_us"][0] = 79.0
    _write(path, table)
    os.utime(path, ns=(1, 1))  # a new modification time, as a rewrite gives
    assert tuned_table.table_for(cuda)["entries"][1]["median_us"] == 79.0


@pytest.mark.parametrize("problem", ["other versions", "malformed", "not json", "directory", "too large"])
def test_unusable_tables_are_ignored_with_one_warning(on_mocked_gpu, monkeypatch, problem):
    path = tuned_table.table_path(DEVICE)
    table = _table(_entry("torch", 100.0))
    if problem == "other versions":
        table["device"] = {**DEVICE, "triton": "3.5.0", "driver": "550.1"}
        _write(path, table)
        expected = "other driver, triton"
    elif problem == "malformed":
        table["entries"][0]["op"] = "dora"
        _write(path, table)
        expected = "op must be"
    elif problem == "not json":
        path.write_text("{")
        expected = "Expecting"
    elif problem == "directory":
        path.mkdir()
        expected = "not a regular file"
    else:
        monkeypatch.setattr(tuned_table, "MAX_TABLE_BYTES", 10)
        _write(path, table)
        expected = "limit"
    with pytest.warns(RuntimeWarning, match=expected):
        assert tuned_table.table_for(torch.device("cuda")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert tuned_table.table_for(torch.device("cuda")) is None


def test_tables_of_other_gpus_get_a_notice(on_mocked_gpu):
    _write(on_mocked_gpu / "tuned-nvidia-a100-sxm4-80gb-sm-80.json", _table(_entry("torch", 1.0)))
    with pytest.warns(RuntimeWarning, match="for other GPUs"):
        assert tuned_table.table_for(torch.device("cuda")) is None


# --- auto follows the table (LoRA dispatch) ------------------------------------------------

needs_triton = pytest.mark.skipif(not backend.triton_available(), reason="needs triton")


def _problem(m: int, r: int = 16, dtype=torch.bfloat16):
    with FakeTensorMode():
        return (torch.empty(m, 4096, dtype=dtype, device="cuda"), torch.empty(4096, 4096, dtype=dtype, device="cuda"),
                torch.empty(r, 4096, dtype=torch.float32, device="cuda"))


@needs_triton
def test_auto_follows_the_tuned_table_only_where_validation_passed(on_mocked_gpu, monkeypatch):
    from fastpeft.kernels.lora.dispatch import choose_implementation

    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    monkeypatch.setattr(backend, "KERNELS_VALIDATED_ON_GPU", False)
    assert choose_implementation(*_problem(4096), True) == "torch"  # no table: today's behaviour
    _write(tuned_table.table_path(DEVICE), _table(
        _entry("torch", 100.0, m=4096), _entry("fused-tma", 70.0, m=4096), _entry("hybrid", 80.0, m=4096),
        _entry("torch", 10.0, m=1), _entry("fused", 5.0, m=1, passed=False), _entry("hybrid", 9.0, m=1),
        _entry("torch", 10.0, m=1, mode="inference"), _entry("fused", 5.0, m=1, mode="inference"),
        _entry("torch", 10.0, m=64, dtype="float16"), _entry("no-such-path", 1.0, m=64, dtype="float16"),
        _entry("torch", 100.0, m=4096, mode="training_dropout"), _entry("hybrid", 80.0, m=4096, mode="training_dropout")))
    assert choose_implementation(*_problem(4096), True) == "fused-tma"
    assert choose_implementation(*_problem(4096), True, True) == "hybrid"  # the entries with dropout
    # dropout is a training step's, even in a forward without backward (reentrant checkpointing)
    assert choose_implementation(*_problem(4096), False, True) == "hybrid"
    assert choose_implementation(*_problem(8192), True) == "fused-tma"
    assert choose_implementation(*_problem(1), True) == "hybrid"  # fused failed there
    assert choose_implementation(*_problem(1), False) == "fused"  # the inference entries
    assert choose_implementation(*_problem(64, dtype=torch.float16), True) == "torch"  # an unknown name
    # what always takes the torch path still does; a forced backend ignores the table
    assert choose_implementation(*_problem(4096, r=65), True) == "torch"
    monkeypatch.setenv("FASTPEFT_BACKEND", "hybrid")
    assert choose_implementation(*_problem(4096), True) == "hybrid"
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    assert choose_implementation(*_problem(4096), True) == "torch"


@needs_triton
def test_without_a_table_validated_auto_keeps_the_shipped_table(on_mocked_gpu, monkeypatch):
    from fastpeft.kernels.lora import dispatch

    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    monkeypatch.setattr(backend, "KERNELS_VALIDATED_ON_GPU", True)
    monkeypatch.setattr(dispatch, "device_info", lambda device: (132, 90))
    assert dispatch.choose_implementation(*_problem(1), False) == "fused"  # the shipped rules of thumb
    assert dispatch.choose_implementation(*_problem(4096), False) == "hybrid"
