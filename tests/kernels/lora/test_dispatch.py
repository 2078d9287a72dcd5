"""The per-shape dispatch of the LoRA op (fastpeft.kernels.lora.dispatch): which implementation
each FASTPEFT_BACKEND setting picks, the table lookup, the shipped table, and the writers that
turn benchmark JSON or a ``fastpeft tune`` table into a table (synthetic inputs, CPU only)."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastpeft import backend
from fastpeft.kernels import tuned_table
from fastpeft.kernels.lora import configs as lora_configs, dispatch as lora_dispatch
from fastpeft.kernels.lora.dispatch import (
    TRAINING,
    INFERENCE,
    FUSED,
    FUSED_TMA,
    HYBRID,
    SCHEMA,
    TORCH,
    choose_implementation,
    lookup,
    shipped_table,
    table_from_bench,
    validate_table,
)

needs_triton = pytest.mark.skipif(not backend.triton_available(), reason="needs triton")


def _problem(m: int, k: int, n: int, r: int, dtype=torch.bfloat16, lora_dtype=None, device="cuda"):
    """Fake tensors (no memory, any device) for x [m, k], W [n, k], A [r, k]."""
    with FakeTensorMode():
        return (torch.empty(m, k, dtype=dtype, device=device), torch.empty(n, k, dtype=dtype, device=device),
                torch.empty(r, k, dtype=lora_dtype or dtype, device=device))


@pytest.fixture
def on_h100(monkeypatch):
    """CUDA tensors are on an sm_90 GPU with 132 SMs."""
    monkeypatch.setattr(lora_dispatch, "device_info", lambda device: (132, 90))


@needs_triton
@pytest.mark.parametrize("choice,expected", [("triton", FUSED), ("hybrid", HYBRID), ("torch", TORCH), ("auto", TORCH)])
@pytest.mark.parametrize("m", [1, 4096])
def test_forced_backends_and_unvalidated_auto(monkeypatch, choice, expected, m):
    """``triton`` forces the fused kernels, ``hybrid`` the hybrid path, for every M; ``auto``
    keeps the torch path on CUDA until the kernels are validated on a GPU."""
    monkeypatch.setenv("FASTPEFT_BACKEND", choice)
    monkeypatch.setattr(backend, "KERNELS_VALIDATED_ON_GPU", False)
    for training in (False, True):
        assert choose_implementation(*_problem(m, 4096, 4096, 16), training) == expected


@needs_triton
def test_validated_auto_follows_the_table(monkeypatch, on_h100):
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    monkeypatch.setattr(backend, "KERNELS_VALIDATED_ON_GPU", True)
    assert choose_implementation(*_problem(1, 4096, 4096, 16), False) == FUSED  # the shipped rules of thumb
    assert choose_implementation(*_problem(4096, 4096, 4096, 16), False) == HYBRID
    table = {"schema": SCHEMA, "entries": [
        {"arch": "sm_90", "dtype": "bfloat16", "mode": "training", "n": 4096, "k": 4096,
         "implementation": TORCH, "measured": "unmeasured: test"},
        {"implementation": FUSED, "measured": "unmeasured: test"},
    ]}
    monkeypatch.setattr(lora_dispatch, "shipped_table", lambda: table)
    assert choose_implementation(*_problem(4096, 4096, 4096, 16), True) == TORCH
    assert choose_implementation(*_problem(4096, 4096, 4096, 16), False) == FUSED
    assert choose_implementation(*_problem(4096, 4096, 4096, 16, dtype=torch.float16), True) == FUSED
    # a table written from a GPU run where the TMA forward won (no rule of thumb picks it)
    table["entries"].insert(0, {"arch": "sm_90", "m_min": 2049, "implementation": FUSED_TMA,
                                "measured": "unmeasured: test"})
    assert choose_implementation(*_problem(4096, 4096, 4096, 16), False) == FUSED_TMA
    assert choose_implementation(*_problem(2048, 4096, 4096, 16), False) == FUSED
    assert FUSED_TMA not in {e["implementation"] for e in shipped_table.__wrapped__()["entries"]}


@needs_triton
@pytest.mark.parametrize("choice", ["triton", "hybrid"])
def test_what_always_takes_the_torch_path(monkeypatch, choice):
    """Ranks above MAX_RANK, empty problems, float64, fp32 activations on a GPU, and CUDA
    problems the kernels would launch unaligned (``lora_configs.kernel_friendly``)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", choice)
    cases = [
        _problem(8, 64, 64, lora_configs.MAX_RANK + 1),
        _problem(0, 64, 64, 4),
        _problem(8, 64, 0, 4),
        _problem(8, 64, 64, 4, dtype=torch.float32),
        _problem(8, 64, 64, 4, dtype=torch.float16, lora_dtype=torch.float64),
        _problem(8, 64, 64, 4, dtype=torch.float64, device="cpu"),
        _problem(8, 4095, 64, 4),
        _problem(8, 64, 1031, 4),
    ]
    for args in cases:
        assert choose_implementation(*args, False) == TORCH
    # fp32 activations and unaligned shapes reach the kernels in the interpreter only.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_implementation(*_problem(8, 64, 64, 4, dtype=torch.float32, device="cpu"), False) != TORCH
    assert choose_implementation(*_problem(8, 4095, 1031, 4, device="cpu"), False) != TORCH


def test_cpu_tensors_take_the_torch_path_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for choice in ("auto", "torch", "hybrid", "triton") if backend.triton_available() else ("auto", "torch"):
        monkeypatch.setenv("FASTPEFT_BACKEND", choice)
        assert choose_implementation(*_problem(8, 64, 64, 4, device="cpu"), False) == TORCH


def test_shipped_table_is_valid_and_says_why():
    table = shipped_table()
    assert validate_table(table) is table
    for entry in table["entries"]:
        assert isinstance(entry["measured"], dict) or entry["measured"].startswith("unmeasured: rule of thumb")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("mode", [INFERENCE, TRAINING])
def test_shipped_rule_of_thumb_fused_for_decode_hybrid_above(arch, mode):
    """The rule of thumb splits at the decode regime of the kernels' tile tables."""
    def pick(m):
        return lookup(shipped_table(), arch=arch, dtype=torch.bfloat16, mode=mode, m=m, n=4096, k=4096)

    assert pick(1)["implementation"] == pick(lora_configs.DECODE_MAX_M)["implementation"] == FUSED
    assert pick(lora_configs.DECODE_MAX_M + 1)["implementation"] == pick(10**6)["implementation"] == HYBRID


def _entry(impl: str, **conditions) -> dict:
    """A table entry with ``conditions``."""
    return {**conditions, "implementation": impl, "measured": "unmeasured: test"}


# A table with every kind of condition: M ranges, two shapes, an arch family, a shapeless fallback.
TABLE = {"schema": SCHEMA, "entries": [
    _entry(FUSED, arch="sm_90", dtype="bfloat16", mode=INFERENCE, n=4096, k=4096, m_max=64),
    _entry(HYBRID, arch="sm_90", dtype="bfloat16", mode=INFERENCE, n=4096, k=4096, m_min=65),
    _entry(TORCH, arch="sm_90", dtype="bfloat16", mode=INFERENCE, n=4096, k=14336),
    _entry(TORCH, arch="sm_80", n=1024, k=1024),
    _entry(FUSED),
]}


def _pick(**query) -> str:
    defaults = {"arch": "sm_90", "dtype": "bfloat16", "mode": INFERENCE, "m": 100, "n": 4096, "k": 4096}
    return lookup(validate_table(TABLE), **{**defaults, **query})["implementation"]


def test_lookup_by_m_range():
    assert _pick(m=1) == _pick(m=64) == FUSED
    assert _pick(m=65) == _pick(m=10**7) == HYBRID


def test_lookup_nearest_shape_in_octaves():
    assert _pick(k=12000) == TORCH  # nearer 14336 than 4096
    assert _pick(k=6000) == HYBRID
    assert _pick(n=2048, k=2048) == HYBRID  # two octaves from 4096^2, more from 4096 x 14336


def test_lookup_arch_family_dtype_and_mode():
    assert _pick(arch="sm_100") == HYBRID  # newer than sm_90: the Hopper family
    assert _pick(arch="sm_86", n=1024, k=1024) == TORCH  # the sm_80 family
    assert _pick(arch="sm_86") == TORCH  # a shaped entry, however far, before the shapeless one
    assert _pick(dtype=torch.float16) == FUSED  # only the shapeless entry matches
    assert _pick(mode=TRAINING) == FUSED


def test_lookup_ties_keep_table_order():
    table = {"schema": SCHEMA, "entries": [_entry(TORCH, m_max=10), _entry(HYBRID), _entry(FUSED)]}
    assert lookup(validate_table(table), arch="sm_90", dtype="bfloat16", mode=INFERENCE, m=5, n=8, k=8)[
        "implementation"] == TORCH
    assert lookup(table, arch="sm_90", dtype="bfloat16", mode=INFERENCE, m=11, n=8, k=8)["implementation"] == HYBRID


@pytest.mark.parametrize("entries,message", [
    ([_entry("cublas")], "implementation"),
    ([{"implementation": FUSED}], "measured"),
    ([{"implementation": FUSED, "measured": "chosen by hand"}], "measured"),
    ([_entry(FUSED, n=4096), _entry(FUSED)], "'n' and 'k'"),
    ([_entry(FUSED, m_min=0)], "m_min"),
    ([_entry(FUSED, m_min=9, m_max=8), _entry(FUSED)], "m_min"),
    ([_entry(FUSED, shape="down"), _entry(FUSED)], "unknown keys"),
    ([_entry(FUSED, m_max=16), _entry(HYBRID, m_min=18)], "M = 17"),
    ([_entry(FUSED, arch="sm_90")], "M = 1"),
    ([_entry(FUSED, arch="hopper"), _entry(FUSED)], "sm_XY"),
])
def test_invalid_tables_are_rejected(entries, message):
    with pytest.raises(ValueError, match=message):
        validate_table({"schema": SCHEMA, "entries": entries})


def test_wrong_schema_is_rejected():
    with pytest.raises(ValueError, match="schema"):
        validate_table({"schema": "fastpeft-lora-dispatch/0", "entries": []})


def _row(impl: str, mode: str, m: int, ms: float | None, n: int = 4096, k: int = 4096, r: int = 16, error=None) -> dict:
    """One timing row as ``fastpeft bench --json`` writes it (schema fastpeft-bench/3)."""
    spread = None if ms is None else {"value": ms, "low": ms * 0.98, "high": ms * 1.02}
    return {"shape": "q", "m": m, "n": n, "k": k, "r": r, "mode": mode, "impl": impl,
            "ms": spread, "reps": 50, "error": error}


def _bench(rows: list[dict]) -> dict:
    return {"schema": "fastpeft-bench/3",
            "settings": {"date": "2026-12-01T10:00:00+00:00", "device_name": "NVIDIA H200", "dtype": "bfloat16"},
            "timings": rows}


# A synthetic benchmark run on one shape: three Ms forward, one M backward at two ranks.
BENCH = _bench([
    # forward: fused wins at decode, hybrid at prefill
    _row(FUSED, "fwd", 1, 0.010), _row(HYBRID, "fwd", 1, 0.014), _row(TORCH, "fwd", 1, 0.030),
    _row(FUSED, "fwd", 256, 0.050), _row(HYBRID, "fwd", 256, 0.040), _row(TORCH, "fwd", 256, 0.080),
    _row(FUSED, "fwd", 4096, 0.500), _row(HYBRID, "fwd", 4096, 0.450), _row(TORCH, "fwd", 4096, 0.700),
    # backward at one M, two ranks: hybrid wins the sum although fused wins rank 16
    _row(FUSED, "fwd+bwd", 4096, 1.00), _row(HYBRID, "fwd+bwd", 4096, 1.05),
    _row(FUSED, "fwd+bwd", 4096, 1.30, r=64), _row(HYBRID, "fwd+bwd", 4096, 1.10, r=64),
    # torch errored at rank 64: out of the backward's race
    _row(TORCH, "fwd+bwd", 4096, 0.5), _row(TORCH, "fwd+bwd", 4096, None, r=64, error="OOM"),
    # ignored: other implementations and modes, rows not ok or that ran another path
    _row("base", "fwd", 256, 0.001), _row("peft", "fwd", 256, 0.002), _row(FUSED, "bwd-only", 256, 0.001),
    {**_row(HYBRID, "fwd", 1, 0.001), "status": "skipped"},
    {**_row(HYBRID, "fwd", 2, 0.001), "runs": "torch path"},
])


def test_table_from_bench_picks_the_fastest_per_shape_and_mode():
    table = table_from_bench(BENCH, "sm_90")
    measured = [e for e in table["entries"] if isinstance(e["measured"], dict)]
    forward = [e for e in measured if e["mode"] == INFERENCE]
    assert [(e.get("m_min"), e.get("m_max"), e["implementation"]) for e in forward] == [
        (None, 16, FUSED),  # split at isqrt(1 * 256) = 16
        (17, 1024, HYBRID),  # and at isqrt(256 * 4096) = 1024
        (1025, None, HYBRID),
    ]
    assert all(e["arch"] == "sm_90" and e["dtype"] == "bfloat16" and (e["n"], e["k"]) == (4096, 4096)
               for e in measured)
    first = forward[0]["measured"]
    assert first == {"gpu": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00", "m": 1, "ranks": [16],
                     "median_ms": {FUSED: 0.01, HYBRID: 0.014, TORCH: 0.03}, "ratio": round(0.010 / 0.014, 4)}
    (backward,) = [e for e in measured if e["mode"] == TRAINING]
    assert backward["implementation"] == HYBRID and "m_min" not in backward and "m_max" not in backward
    assert backward["measured"]["ranks"] == [16, 64]
    assert backward["measured"]["median_ms"] == {FUSED: 2.3, HYBRID: 2.15}
    # the shipped rules of thumb follow as fallback
    assert table["entries"][len(measured):] == shipped_table()["entries"]


def test_written_table_drives_lookup():
    table = table_from_bench(BENCH, "sm_90")

    def pick(mode, m, arch="sm_90"):
        return lookup(table, arch=arch, dtype=torch.bfloat16, mode=mode, m=m, n=4096, k=4096)

    assert pick(INFERENCE, 16)["implementation"] == FUSED and pick(INFERENCE, 17)["implementation"] == HYBRID
    assert pick(TRAINING, 1)["implementation"] == HYBRID  # one measured M covers every M
    assert pick(INFERENCE, 1, arch="sm_80")["measured"].startswith("unmeasured")  # measured on sm_90 only


def test_table_from_bench_takes_the_tma_row_where_it_won_at_every_rank():
    """The focused benchmark's fused-tma row (M above the medium tiles only) races the others
    at its Ms: it wins M = 4096 where it is fastest at both ranks' sum, and at M = 16384 it is
    out, having no rank-64 time (a deadline cut it), so the fastest of the rest wins."""
    rows = [_row(FUSED, "fwd", 4096, 0.50), _row(FUSED, "fwd", 4096, 0.90, r=64),
            _row(FUSED_TMA, "fwd", 4096, 0.46), _row(FUSED_TMA, "fwd", 4096, 0.88, r=64),
            _row(HYBRID, "fwd", 4096, 0.48), _row(HYBRID, "fwd", 4096, 0.95, r=64),
            _row(FUSED, "fwd", 16384, 1.9), _row(FUSED, "fwd", 16384, 3.4, r=64),
            _row(FUSED_TMA, "fwd", 16384, 1.5), _row(HYBRID, "fwd", 16384, 2.0), _row(HYBRID, "fwd", 16384, 3.6, r=64)]
    measured = [e for e in table_from_bench(_bench(rows), "sm_90")["entries"] if isinstance(e["measured"], dict)]
    assert [(e["measured"]["m"], e["implementation"]) for e in measured] == [(4096, FUSED_TMA), (16384, FUSED)]
    assert measured[0]["measured"]["median_ms"] == {FUSED: 1.4, FUSED_TMA: 1.34, HYBRID: 1.43}
    assert FUSED_TMA not in measured[1]["measured"]["median_ms"]


def test_table_from_bench_needs_usable_rows_and_a_dtype():
    with pytest.raises(ValueError, match="no usable timings"):
        table_from_bench(_bench([_row("peft", "fwd", 1, 0.1), _row(FUSED, "fwd", 1, 0.1, error="boom")]), "sm_90")
    with pytest.raises(ValueError, match="dtype"):
        table_from_bench({"timings": BENCH["timings"]}, "sm_90")


def test_plain_number_times_are_accepted():
    rows = [{**r, "ms": r["ms"]["value"]} for r in BENCH["timings"][:3]]
    (entry,) = [e for e in table_from_bench(_bench(rows), "sm_90")["entries"] if isinstance(e["measured"], dict)]
    assert entry["implementation"] == FUSED


def test_cli_writes_a_table(tmp_path, capsys):
    bench_path, out = tmp_path / "bench.json", tmp_path / "table.json"
    bench_path.write_text(json.dumps(BENCH))
    assert lora_dispatch.main(["--from-bench", str(bench_path), "--out", str(out), "--arch", "sm_90"]) == 0
    written = validate_table(json.loads(out.read_text()))
    assert written == table_from_bench(BENCH, "sm_90")
    assert "4 measured entries" in capsys.readouterr().err


def test_cli_takes_the_arch_from_the_bench_settings(tmp_path):
    bench = _bench(BENCH["timings"])
    bench["settings"]["arch"] = "sm_80"
    bench_path, out = tmp_path / "bench.json", tmp_path / "table.json"
    bench_path.write_text(json.dumps(bench))
    assert lora_dispatch.main(["--from-bench", str(bench_path), "--out", str(out)]) == 0
    assert {e["arch"] for e in json.loads(out.read_text())["entries"] if "arch" in e} == {"sm_80"}


@pytest.mark.parametrize("problem", ["missing", "not json", "no arch"])
def test_cli_usage_errors_exit_2(tmp_path, monkeypatch, capsys, problem):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench_path = tmp_path / "bench.json"
    if problem == "not json":
        bench_path.write_text("{")
    elif problem == "no arch":
        bench_path.write_text(json.dumps(BENCH))
    assert lora_dispatch.main(["--from-bench", str(bench_path), "--out", str(tmp_path / "t.json")]) == 2
    assert "lora_dispatch:" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_the_table_ships_with_the_package():
    """The table is package data next to the module (the wheel takes the whole package
    directory, pyproject.toml wheel.packages)."""
    import importlib.resources

    text = importlib.resources.files("fastpeft.kernels.lora").joinpath(lora_dispatch.TABLE_FILE).read_text()
    assert json.loads(text)["schema"] == SCHEMA


def test_the_op_asks_for_a_training_steps_choice_when_a_backward_follows(monkeypatch):
    """A forward whose backward follows (grad enabled, an input requiring grad) and that
    backward run the training step's implementation, the pair a fwd+bwd timing measured (but a
    backward whose forward kept a dropout mask takes the torch path, which reads it); a forward
    without backward runs the inference choice."""
    from fastpeft.ops import lora_linear

    asked: list[bool] = []

    def choose(x, weight, lora_a, training, dropout=False):
        asked.append(training)
        return TORCH

    monkeypatch.setattr(lora_dispatch, "choose_implementation", choose)
    x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with torch.no_grad():
        lora_linear(x, w, None, a.requires_grad_(), b, 1.0)
    assert asked == [False]
    asked.clear()
    lora_linear(x, w, None, a, b, 1.0).sum().backward()
    assert asked == [True, True]
    asked.clear()
    # the torch path kept its dropout mask (the CPU's): the backward is the torch path's, which reads it
    lora_linear(x, w, None, a, b, 1.0, 0.1, training=True).sum().backward()
    assert asked == [True]
    asked.clear()
    lora_linear(x, w, None, a.detach(), b, 1.0)  # nothing requires grad: no backward
    assert asked == [False]


def _tuned(*entries: tuple) -> dict:
    """A tuned table (fastpeft.kernels.tuned_table) on an H100 of ``(op, mode, M, r,
    implementation, median_us, passed)`` entries at K = N = 4096, each spread +-5%."""
    device = {"gpu": "NVIDIA H100 80GB HBM3", "sms": 132, "capability": "sm_90", "driver": "1", "torch": "t",
              "triton": "3", "fastpeft": "0"}
    return {"schema": tuned_table.SCHEMA, "device": device, "entries": [
        {"device": device["gpu"], "op": op, "mode": mode, "dtype": "bfloat16", "M": m, "K": 4096, "N": 4096, "r": r,
         "implementation": impl, "max_rel_error": 0.004, "passed": passed, "median_us": us,
         "spread_us": [us * 0.95, us * 1.05]} for op, mode, m, r, impl, us, passed in entries]}


def test_table_from_tune_follows_the_tuned_choice():
    """Per mode and M: the implementation the tuned table picks at every rank (only what
    passed, only beyond the spread); the torch path where the ranks disagree; entries with
    dropout and of other ops ignored."""
    rows = []
    for r in (16, 64):
        rows += [("lora", TRAINING, 4096, r, TORCH, 1000.0, True), ("lora", TRAINING, 4096, r, HYBRID, 800.0, True),
                 ("lora", TRAINING, 4096, r, FUSED, 700.0, False),  # fastest, but failed validation
                 ("lora", INFERENCE, 1, r, TORCH, 50.0, True), ("lora", INFERENCE, 1, r, FUSED, 30.0, True),
                 ("lora", "training_dropout", 4096, r, TORCH, 1000.0, True),
                 ("bottleneck", INFERENCE, 1, r, TORCH, 10.0, True)]
    # at M = 16 fused wins at rank 16 only: the ranks disagree
    rows += [("lora", INFERENCE, 16, 16, TORCH, 60.0, True), ("lora", INFERENCE, 16, 16, FUSED, 40.0, True),
             ("lora", INFERENCE, 16, 64, TORCH, 60.0, True), ("lora", INFERENCE, 16, 64, FUSED, 59.0, True)]
    table = lora_dispatch.table_from_tune(_tuned(*rows), "sm_90", "2026-12-07")
    measured = [e for e in table["entries"] if isinstance(e["measured"], dict)]
    picked = {(e["mode"], e["measured"]["m"]): e["implementation"] for e in measured}
    assert picked == {(TRAINING, 4096): HYBRID, (INFERENCE, 1): FUSED, (INFERENCE, 16): TORCH}
    training = next(e for e in measured if e["mode"] == TRAINING)
    assert training["measured"] == {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-07", "m": 4096, "ranks": [16, 64],
                                    "median_ms": {HYBRID: 1.6, TORCH: 2.0}, "ratio": 0.8}
    inference = sorted((e for e in measured if e["mode"] == INFERENCE), key=lambda e: e["measured"]["m"])
    assert [(e.get("m_min", 1), e.get("m_max")) for e in inference] == [(1, 4), (5, None)]
    assert lookup(table, arch="sm_90", dtype=torch.bfloat16, mode=INFERENCE, m=2, n=4096, k=4096)["implementation"] == FUSED


def test_table_from_tune_cli_takes_the_report_and_its_arch(tmp_path, capsys):
    report = {"table": _tuned(("lora", TRAINING, 4096, 16, TORCH, 1000.0, True),
                              ("lora", TRAINING, 4096, 16, HYBRID, 500.0, True)), "failures": []}
    path, out = tmp_path / "tune.json", tmp_path / "table.json"
    path.write_text(json.dumps(report))
    assert lora_dispatch.main(["--from-tune", str(path), "--out", str(out), "--date", "2026-12-07"]) == 0
    written = validate_table(json.loads(out.read_text()))
    assert written == lora_dispatch.table_from_tune(report, "sm_90", "2026-12-07")
    assert "1 measured entries" in capsys.readouterr().err


@pytest.mark.parametrize("rows,message", [
    ([("bottleneck", INFERENCE, 1, 16, TORCH, 10.0, True)], "one activation dtype, found none"),
    ([("lora", INFERENCE, 1, 16, FUSED, 10.0, False)], "no LoRA shape"),
])
def test_table_from_tune_refuses_tables_without_usable_lora_entries(rows, message):
    with pytest.raises(ValueError, match=message):
        lora_dispatch.table_from_tune(_tuned(*rows), "sm_90", "2026-12-07")
