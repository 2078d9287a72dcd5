"""The focused kernel benchmark (``fastpeft.bench.focused``) on CPU, on tiny problems: its
JSON schema, the rotation count, the time guard and SIGINT (the JSON is written either way),
rows marked unavailable, the ratios, the fastest-row table, the dispatch-table input, and
the command line. No test asserts on a measured time."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest
import torch

from fastpeft import backend
from fastpeft.bench import bottleneck, focused, multi_lora
from fastpeft.bench.__main__ import main as bench_main
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, LayerShape
from fastpeft.bench.op_bench import OpRow
from fastpeft.bench.timing import CPU_CLOCK, TimingBudget
from fastpeft.kernels.lora.configs import TMA_ENV

CPU = torch.device("cpu")
TINY = LayerShape("tiny", 24, 40)  # K = 24, N = 40
# Rows that run in well under a second on CPU (no torch.compile).
QUICK_ROWS = (focused.LINEAR, focused.FUSED, focused.HYBRID, focused.TORCH, focused.PEFT)
ONE_REP = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)
TIMING_KEYS = {"shape", "m", "n", "k", "r", "adapter_dtype", "mode", "impl", "status", "runs", "ms", "reps",
               "rotation", "method", "note", "tflops", "ratio_to_linear", "ratio_to_peft", "error"}


def tiny_config(**overrides) -> focused.FocusedConfig:
    config = focused.FocusedConfig(
        shapes=(TINY,), ms=(5, 9), rank=4, dtype=torch.float32, adapter_dtypes=(torch.float32, torch.bfloat16),
        rows=QUICK_ROWS, device=CPU, timing=ONE_REP, budget_s=600.0, profile_m=5,
    )
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One complete tiny run and the JSON it wrote."""
    path = tmp_path_factory.mktemp("focused") / "focused.json"
    run = focused.run_focused(tiny_config(), path, log=lambda _: None)
    return run, json.loads(path.read_text())


def test_json_has_the_schema_and_every_cell(tiny_run):
    run, data = tiny_run
    assert data == json.loads(json.dumps(run.to_json()))
    assert data["schema"] == focused.SCHEMA and data["complete"] and not data["interrupted"]
    for key in ("dtype", "adapter_dtypes", "rank", "rows", "grid", "timing", "budget_s", "device_name", "torch"):
        assert key in data["settings"]
    # 2 adapter dtypes x 2 M x 2 modes x 5 rows
    assert len(data["timings"]) == 2 * 2 * 2 * len(QUICK_ROWS)
    for timing in data["timings"]:
        assert set(timing) == TIMING_KEYS
        assert timing["status"] == focused.OK, timing
        assert timing["reps"] == 3 and timing["rotation"] == focused.MIN_ROTATION
        assert timing["method"] == CPU_CLOCK
        assert 0 < timing["ms"]["low"] <= timing["ms"]["value"] <= timing["ms"]["high"]
        for ratio in ("ratio_to_linear", "ratio_to_peft"):
            assert timing[ratio]["low"] <= timing[ratio]["value"] <= timing[ratio]["high"]
    linear = [t for t in data["timings"] if t["impl"] == focused.LINEAR]
    assert all(t["ratio_to_linear"] == {"value": 1.0, "low": 1.0, "high": 1.0} for t in linear)


def test_cells_record_the_path_each_row_takes(tiny_run):
    """Without Triton's interpreter, CPU tensors send the kernel rows to the torch path; the
    cells say so rather than pass torch-path times off as kernel times."""
    _, data = tiny_run
    runs = {t["impl"]: t["runs"] for t in data["timings"]}
    kernel_path = "torch path" if not backend.interpreting() else None
    assert runs[focused.FUSED] == (kernel_path or focused.FUSED)
    assert runs[focused.TORCH] == focused.TORCH and runs[focused.PEFT] == focused.PEFT


def test_fp32_adapters_stay_fp32_in_every_row():
    """The rows built on fp32-adapter weights of bf16 layers keep fp32 A and B (PEFT's default)."""
    w = focused.random_weights(TINY, 4, torch.bfloat16, CPU, torch.Generator().manual_seed(0), lora_dtype=torch.float32)
    for name in (focused.FUSED, focused.PEFT, focused.COMPILE):
        impl = focused.build_row(focused.ROWS_BY_NAME[name], w, training=True)
        assert [t.dtype for t in impl.trainable] == [torch.float32, torch.float32], name


def test_fastest_names_a_row_per_measured_cell(tiny_run):
    _, data = tiny_run
    assert len(data["fastest"]) == 2 * 2 * 2
    for entry in data["fastest"]:
        assert entry["overall"] in QUICK_ROWS and entry["overall"] != focused.LINEAR
        assert entry["fastpeft"] in focused.FASTPEFT_ROWS and isinstance(entry["clear"], bool)


def test_profile_lists_every_row(tiny_run):
    _, data = tiny_run
    profile = data["profile"]
    assert profile["m"] == 5 and profile["mode"] == FORWARD_BACKWARD and profile["adapter_dtype"] == "float32"
    assert list(profile["impls"]) == list(QUICK_ROWS)
    for entry in profile["impls"].values():
        assert entry["error"] is None and entry["total_us"] > 0
        assert 0 < len(entry["kernels"]) <= focused.PROFILE_TOP
        assert {"name", "calls", "us"} == set(entry["kernels"][0])


def test_ratios_table_has_a_line_per_measured_cell(tiny_run):
    _, data = tiny_run
    lines = focused.ratios_table(data)
    assert lines[0].split()[:5] == ["adapter", "mode", "shape", "M", "linear"]
    assert len(lines) == 1 + 2 * 2 * 2
    assert lines[1].split()[:4] == ["float32", FORWARD, "tiny", "5"]  # run order: fp32 adapters first


def test_dispatch_input_keeps_one_adapter_dtype_and_the_writer_reads_it(tiny_run):
    _, data = tiny_run
    usable = focused.dispatch_input(data)
    assert usable["settings"] == data["settings"] and len(usable["timings"]) == len(data["timings"]) // 2
    assert {t["adapter_dtype"] for t in usable["timings"]} == {"float32"}
    dispatch = pytest.importorskip("fastpeft.kernels.lora.dispatch")
    table = dispatch.table_from_bench(usable, "sm_90")
    measured = [e for e in table["entries"] if isinstance(e["measured"], dict)]
    # (forward, backward) x 2 Ms of the one shape
    assert len(measured) == 2 * 2 and {e["implementation"] for e in measured} <= set(focused.FASTPEFT_ROWS)


def test_rotation_count_covers_twice_the_cache():
    mib = 2**20
    assert focused.rotation_count(32 * mib, 60 * mib) == 5  # 4 other sets: 128 MiB >= 2 x 60 MiB
    assert focused.rotation_count(700 * mib, 60 * mib) == focused.MIN_ROTATION
    assert focused.rotation_count(1, 60 * mib) == focused.MAX_ROTATION
    assert focused.rotation_count(100, 0) == focused.MIN_ROTATION


def test_without_peft_its_row_is_unavailable_and_the_others_run(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    path = tmp_path / "f.json"
    focused.run_focused(tiny_config(ms=(5,), adapter_dtypes=(torch.float32,)), path, log=lambda _: None)
    data = json.loads(path.read_text())
    peft_rows = [t for t in data["timings"] if t["impl"] == focused.PEFT]
    assert len(peft_rows) == 2 and all(t["status"] == focused.UNAVAILABLE and "peft" in t["error"] for t in peft_rows)
    assert all(t["status"] == focused.OK for t in data["timings"] if t["impl"] != focused.PEFT)
    assert data["profile"]["impls"][focused.PEFT]["error"] == peft_rows[0]["error"]
    assert "n/a" in focused.ratios_table(data)[1].split()


def test_budget_spent_skips_the_cells_and_still_writes_the_json(tmp_path):
    path = tmp_path / "f.json"
    run = focused.run_focused(tiny_config(budget_s=0.0), path, log=lambda _: None)
    data = json.loads(path.read_text())
    assert data["complete"] and not data["interrupted"] and run.complete
    assert {t["status"] for t in data["timings"]} == {focused.SKIPPED}
    assert {t["error"] for t in data["timings"]} == {"time budget"}
    assert data["fastest"] == [] and focused.ratios_table(data) == focused.ratios_table(data)[:1]


def test_sigint_mid_run_keeps_the_cells_measured(monkeypatch, tmp_path):
    """A KeyboardInterrupt (timeout's SIGINT) in the second group: the first group's cells
    stay, the rest are skipped as interrupted, the JSON says so."""
    original, calls = focused._time_group, []

    def interrupt_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(focused, "_time_group", interrupt_second_group)
    path = tmp_path / "f.json"
    focused.run_focused(tiny_config(), path, log=lambda _: None)
    data = json.loads(path.read_text())
    assert data["interrupted"] and not data["complete"]
    statuses = [t["status"] for t in data["timings"]]
    group = 2 * len(QUICK_ROWS)  # one (adapter dtype, M): 2 modes x rows
    assert statuses[:group] == [focused.OK] * group
    assert set(statuses[group:]) == {focused.SKIPPED}
    assert {t["error"] for t in data["timings"][group:]} == {"interrupted"}


def test_a_failing_row_is_recorded_and_the_others_run(monkeypatch, tmp_path):
    original = focused.build_row

    def broken_peft(row, w, training):
        if row.name == focused.PEFT:
            raise RuntimeError("peft exploded\nsecond line")
        return original(row, w, training)

    monkeypatch.setattr(focused, "build_row", broken_peft)
    path = tmp_path / "f.json"
    focused.run_focused(tiny_config(ms=(5,), adapter_dtypes=(torch.float32,)), path, log=lambda _: None)
    data = json.loads(path.read_text())
    peft = [t for t in data["timings"] if t["impl"] == focused.PEFT]
    assert all(t["status"] == focused.ERROR and t["error"] == "RuntimeError: peft exploded" for t in peft)
    others = [t for t in data["timings"] if t["impl"] != focused.PEFT]
    assert all(t["status"] == focused.OK and t["ratio_to_peft"] is None for t in others)
    assert data["profile"]["impls"][focused.PEFT]["error"] == "RuntimeError: peft exploded"


def test_cli_writes_the_json_and_the_dispatch_input(tmp_path, capsys):
    """``fastpeft bench --focused --tiny`` with a budget that skips every cell: the command
    line's plumbing (the profile, which compiles, is what a budget cannot skip)."""
    out, dispatch = tmp_path / "f.json", tmp_path / "d.json"
    assert bench_main(["--focused", "--tiny", "--budget-s", "0", "--json", str(out),
                       "--dispatch-input", str(dispatch)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == focused.SCHEMA and data["settings"]["grid"]["m"] == list(focused.TINY_MS)
    assert not dispatch.exists()  # nothing measured: no input for the dispatch writer
    assert "no dispatch input" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--focused"], ["--focused", "--json", "x", "--budget-s", "-1"]])
def test_cli_usage_errors(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bench_main(argv)
    assert exc.value.code == 2


# --- the other ops (bottleneck adapter, multi-LoRA) ------------------------------------------

TINY_OPS = (
    focused.OpFocus(focused.BOTTLENECK, bottleneck.SPEC, (bottleneck.BottleneckCase(1, 16, 4),),
                    (bottleneck.NAIVE, bottleneck.TORCH, bottleneck.TRITON, bottleneck.LAUNCH)),
    focused.OpFocus(focused.MULTI_LORA, multi_lora.SPEC, (multi_lora.MultiLoRACase(6, 16, 4, 3, multi_lora.ZIPF),),
                    (multi_lora.BASE, multi_lora.LOOP, multi_lora.TORCH, multi_lora.CUDA)),
)


def ops_config(**overrides) -> focused.FocusedConfig:
    settings = {"ms": (5,), "adapter_dtypes": (torch.float32,), "rows": (focused.LINEAR,), "ops": TINY_OPS,
                "ops_budget_s": 600.0}
    return tiny_config(**{**settings, **overrides})


def test_other_ops_cells_ratios_and_skips_in_the_json(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the Triton row: skipped on CPU, with the reason
    path = tmp_path / "f.json"
    focused.run_focused(ops_config(), path, log=lambda _: None)
    data = json.loads(path.read_text())
    assert data["schema"] == focused.SCHEMA and set(data["ops"]) == {focused.BOTTLENECK, focused.MULTI_LORA}
    cells = {(name, t["mode"], t["impl"]): t for name, op in data["ops"].items() for t in op["timings"]}
    assert cells[(focused.BOTTLENECK, FORWARD, bottleneck.TRITON)]["status"] == "skipped"
    assert "CUDA device" in cells[(focused.BOTTLENECK, FORWARD, bottleneck.TRITON)]["error"]
    assert cells[(focused.MULTI_LORA, FORWARD, multi_lora.CUDA)]["status"] == "skipped"
    measured = [t for t in cells.values() if t["status"] == "ok"]
    assert len(measured) == 3 + 2 + 3  # naive, torch (both modes), launch (fwd); base, loop, torch
    assert all(t["method"] == CPU_CLOCK and t["ms"]["low"] <= t["ms"]["value"] for t in measured)
    torch_fwd = cells[(focused.BOTTLENECK, FORWARD, bottleneck.TORCH)]
    assert set(torch_fwd["ratios"]) == {bottleneck.VS_NAIVE, bottleneck.X_LAUNCH} and torch_fwd["ratios"]["x launch"]
    assert any(t["target"].startswith("decode (M=1)") for t in data["ops"][focused.BOTTLENECK]["targets"])
    lines = focused.ops_lines(data)
    assert any(line.startswith("multi-lora T=6 hidden=16") and "vs loop" in line for line in lines)


def test_other_ops_out_of_budget_are_skipped_and_capture_is_off_for_host_reading_rows(tmp_path):
    path = tmp_path / "f.json"
    focused.run_focused(ops_config(ops_budget_s=0.0, budget_s=0.0), path, log=lambda _: None)
    data = json.loads(path.read_text())
    errors = {t["error"] for op in data["ops"].values() for t in op["timings"] if t["status"] == "skipped"}
    assert "time budget" in errors
    assert not multi_lora.SPEC.row(multi_lora.PEFT).capturable and not multi_lora.SPEC.row(multi_lora.LOOP).capturable
    assert all(row.capturable for row in bottleneck.SPEC.rows)


def test_compiling_rows_run_after_every_other_ops_cell(tmp_path):
    """torch.compile's rows (``compiles``) come after all other ops' cells, so their compile time
    cannot crowd the others out of the ops budget."""
    order = []

    def recording(name, compiles=False):
        def build(problem, mode):
            order.append(name)
            return lambda: None

        return OpRow(name, name, build, compiles=compiles)

    spec = dataclasses.replace(bottleneck.SPEC, rows=(recording("slow", compiles=True), recording("fast")),
                               modes=(FORWARD,))
    other = dataclasses.replace(multi_lora.SPEC, rows=(recording("other"),))
    ops = (focused.OpFocus(focused.BOTTLENECK, spec, (bottleneck.BottleneckCase(1, 8, 2),), ("slow", "fast")),
           focused.OpFocus(focused.MULTI_LORA, other, (multi_lora.MultiLoRACase(2, 8, 2, 2, "distinct"),), ("other",)))
    focused.run_focused(ops_config(ops=ops), tmp_path / "f.json", log=lambda _: None)
    first = list(dict.fromkeys(order))
    assert first == ["fast", "other", "slow"]


def test_phases_run_grid_first_then_other_ops_then_profile_then_compiling_rows(tmp_path):
    """The LoRA grid (what the dispatch table needs) comes first, its compile row last, and the
    profile after the other ops: a run cut short keeps the cells most wanted."""
    lines: list[str] = []
    config = tiny_config(rows=(focused.LINEAR, focused.TORCH, focused.COMPILE), ms=(5,),
                         adapter_dtypes=(torch.float32,), ops=focused.TINY_OP_FOCUS[:1], ops_budget_s=60.0)
    run = focused.run_focused(config, tmp_path / "f.json", log=lines.append)
    phases = list(dict.fromkeys(line.split("]")[0] + "]" for line in lines if line.startswith("[")))
    assert phases == ["[1/1]", f"[{focused.BOTTLENECK}]", "[profile]", "[1/1 compile]"], lines
    assert all(c.status == focused.OK for c in run.cells)
    assert all(entry["error"] is None for entry in run.profile["impls"].values())


def test_profile_rows_reached_after_the_deadline_are_not_profiled():
    config = tiny_config(rows=(focused.LINEAR, focused.TORCH))
    profile = focused.profile_rows(config, torch.Generator().manual_seed(0), lambda _: None, deadline=0.0)
    assert {name: entry["error"] for name, entry in profile["impls"].items()} == {
        focused.LINEAR: "time budget", focused.TORCH: "time budget"}


def test_every_row_of_an_op_is_timed_the_same_way(tmp_path, monkeypatch):
    """One row that cannot be captured (it reads ids on the host) makes its op's rows all eager,
    so their ratios compare like with like; an op whose rows all capture keeps CUDA graphs."""
    captured: dict[str, bool] = {}

    def row(name, capturable=True):
        return OpRow(name, name, lambda problem, mode: name, capturable=capturable)

    def time_rounds(steps, device, budget, capture=True):
        """Record each row's capture flag (a step here is its row's name)."""
        captured.update(dict.fromkeys(steps, capture))
        return [1.0, 1.0, 1.0], "recorded", None

    monkeypatch.setattr(focused, "time_rounds", time_rounds)
    mixed = dataclasses.replace(multi_lora.SPEC, rows=(row("ours"), row("host", capturable=False)), modes=(FORWARD,))
    plain = dataclasses.replace(bottleneck.SPEC, rows=(row("graph"),), modes=(FORWARD,))
    ops = (focused.OpFocus(focused.MULTI_LORA, mixed, (multi_lora.MultiLoRACase(2, 8, 2, 2, "distinct"),),
                           ("ours", "host")),
           focused.OpFocus(focused.BOTTLENECK, plain, (bottleneck.BottleneckCase(1, 8, 2),), ("graph",)))
    run = focused.run_focused(ops_config(ops=ops), tmp_path / "f.json", log=lambda _: None)
    assert captured == {"ours": False, "host": False, "graph": True}
    notes = {t.row: t.note for t in run.ops[focused.MULTI_LORA].timings}
    assert notes == {"ours": focused.EAGER_NOTE, "host": focused.NOT_CAPTURABLE_NOTE}


def test_the_tma_row_runs_only_large_m_cells_under_its_variable(monkeypatch, tmp_path):
    """The opt-in TMA forward's row: left out of the CPU and rehearsal grids, timed only at
    M above the medium tiles (below them it would run the fused row's kernels), each step
    with ``FASTPEFT_LORA_TMA=1`` set (and nothing left set after it)."""
    assert focused.FUSED_TMA not in focused.default_config(CPU, tiny=True).rows
    assert focused.FUSED_TMA not in focused.default_config(CPU, tiny=False).rows
    row = focused.ROWS_BY_NAME[focused.FUSED_TMA]
    small, large = 5, row.min_m
    cells = focused.plan_cells(tiny_config(ms=(small, large), rows=(focused.FUSED, focused.FUSED_TMA)))
    assert {c.case.m for c in cells if c.row == focused.FUSED} == {small, large}
    assert {c.case.m for c in cells if c.row == focused.FUSED_TMA} == {large}
    seen = []

    def step_reading_the_environment(impl, x, dy, mode):
        return lambda: seen.append((os.environ.get(TMA_ENV), os.environ.get("FASTPEFT_BACKEND")))

    monkeypatch.delenv(TMA_ENV, raising=False)
    monkeypatch.setattr(focused, "make_step", step_reading_the_environment)
    monkeypatch.setattr(focused, "build_row", lambda row, w, training: None)
    config = tiny_config(ms=(5,))
    sets = focused.make_input_sets(focused.plan_cells(config)[0].case, config, torch.float32,
                                   torch.Generator().manual_seed(0))
    for name, expected in ((focused.FUSED_TMA, ("1", "triton")), (focused.FUSED, (None, "triton"))):
        for step in focused.row_steps(focused.ROWS_BY_NAME[name], sets, FORWARD):
            step()
        assert seen[-1] == expected
    assert TMA_ENV not in os.environ


def test_the_tma_row_says_when_it_runs_the_fused_kernels(monkeypatch):
    """``runs`` of the fused-tma row: itself where the TMA forward can run (sm_90, and the
    interpreter, which plans as sm_90), ``fused`` on an older GPU (so the dispatch-table
    writer and the plan comparison skip its times), the torch path where the kernels do not run."""
    from fastpeft.kernels.lora import configs as lora_configs

    row = focused.ROWS_BY_NAME[focused.FUSED_TMA]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert focused.path_taken(row, CPU) == focused.FUSED_TMA
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert focused.path_taken(row, CPU) == "torch path"
    cuda = torch.device("cuda", 0)
    for capability, expected in ((90, focused.FUSED_TMA), (80, focused.FUSED)):
        monkeypatch.setattr(lora_configs, "_device_props", lambda index, c=capability: (132, c))
        monkeypatch.setattr(focused.backend, "use_triton", lambda device: True)
        assert focused.path_taken(row, cuda) == expected
