"""Fast CPU tests of the benchmark harness (fastpeft.bench): saved-activation accounting on
hand-computed cases, FLOP counts, ratios, targets, JSON schema, report tables, CLI errors.
No test asserts on a measured time."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastpeft.bench.__main__ import main
from fastpeft.bench.analysis import analyze
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, BenchCase, CaseGrid, LayerShape, lora_flops
from fastpeft.bench.export import SCHEMA, to_json_dict
from fastpeft.bench.implementations import (
    BASE, FASTPEFT, NAIVE, PEFT, build_implementation, default_implementations, random_weights,
)
from fastpeft.bench.memory import measure_saved_activations, saved_elements_limit
from fastpeft.bench.report import format_bytes, markdown_table, plain_table
from fastpeft.bench.results import TimingResult, compute_metrics
from fastpeft.bench.runner import BenchConfig, make_inputs, run_benchmark
from fastpeft.bench.targets import check_targets
from fastpeft.bench.timing import TimingBudget, median_time_ms

CPU = torch.device("cpu")
TINY = LayerShape("tiny", 24, 40)  # K = 24, N = 40
ONE_CALL = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)


def tiny_case(m: int = 5, r: int = 2) -> BenchCase:
    return BenchCase(TINY, m, r)


def tiny_tensors(case: BenchCase):
    generator = torch.Generator().manual_seed(0)
    weights = random_weights(case.shape, case.r, torch.float32, CPU, generator)
    return (weights, *make_inputs(case, torch.float32, CPU, generator))


# --- saved-activation accounting -------------------------------------------------------


def test_saved_activations_counts_each_storage_once():
    """exp saves its result and mm saves the same tensor again: one M*K fp32 storage."""
    x = torch.randn(3, 5, requires_grad=True)
    a = torch.randn(2, 5, requires_grad=True)
    saved = measure_saved_activations(lambda t: t.exp() @ a.t(), x, owned=[a])
    assert (saved.bytes, saved.elements, saved.storages) == (3 * 5 * 4, 15, 1)


def test_saved_activations_exclude_x_weights_and_their_views():
    x = torch.randn(3, 5, requires_grad=True)
    a = torch.randn(2, 5, requires_grad=True)
    saved = measure_saved_activations(lambda t: t.view(15).view(3, 5) @ a.t(), x, owned=[a])
    assert (saved.bytes, saved.elements, saved.storages) == (0, 0, 0)


def test_scalar_storages_count_in_bytes_but_not_elements():
    """mul by a 0-d tensor that requires grad saves it: 4 bytes, a scalar, no elements."""
    x = torch.randn(3, 5, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    saved = measure_saved_activations(lambda t: t * scale, x, owned=[])
    assert (saved.bytes, saved.elements, saved.storages) == (4, 0, 1)


def test_base_linear_with_frozen_weight_saves_nothing_beyond_x():
    case = tiny_case()
    weights, x, _ = tiny_tensors(case)
    base = build_implementation(BASE, weights, 0.1, training=True)
    assert measure_saved_activations(base.forward, x, base.owned).bytes == 0


@pytest.mark.parametrize("impl", [NAIVE, PEFT])
def test_peft_formula_with_dropout_keeps_a_copy_of_x(impl):
    if impl not in default_implementations():
        pytest.skip("peft is not installed")
    case = tiny_case()
    weights, x, _ = tiny_tensors(case)
    implementation = build_implementation(impl, weights, 0.1, training=True)
    saved = measure_saved_activations(implementation.forward, x, implementation.owned)
    assert saved.elements >= case.m * case.shape.in_features  # the dropped-out x
    assert saved.elements > saved_elements_limit(case.m, case.r)


def test_fastpeft_meets_the_saved_activation_criterion():
    case = tiny_case()
    weights, x, _ = tiny_tensors(case)
    implementation = build_implementation(FASTPEFT, weights, 0.1, training=True)
    saved = measure_saved_activations(implementation.forward, x, implementation.owned)
    assert saved.elements <= saved_elements_limit(case.m, case.r)


def test_implementations_agree_on_the_same_weights():
    """Every implementation computes the same y on the same weights (dropout off)."""
    case = tiny_case()
    weights, x, _ = tiny_tensors(case)
    expected = build_implementation(NAIVE, weights, 0.0, training=False).forward(x)
    for name in default_implementations():
        if name != BASE:
            y = build_implementation(name, weights, 0.0, training=False).forward(x)
            torch.testing.assert_close(y, expected, msg=name)


# --- FLOPs, ratios, targets --------------------------------------------------------------


def test_lora_flops_by_hand():
    m, n, k, r = 2, 3, 4, 1
    assert lora_flops(m, n, k, r, FORWARD) == 48 + 16 + 12  # 2MNK + 2MKr + 2MNr
    # backward: dx = dy W (48), ds = dy B (12), dx += ds A (16), dA (16), dB (12)
    assert lora_flops(m, n, k, r, FORWARD_BACKWARD) == 76 + 48 + 12 + 16 + 16 + 12
    assert lora_flops(m, n, k, 0, FORWARD_BACKWARD) == 2 * 48  # base: forward and dx only
    with pytest.raises(ValueError, match="unknown mode"):
        lora_flops(m, n, k, r, "bwd")


def synthetic_timings(case: BenchCase, mode: str, times: dict[str, float | None]) -> list[TimingResult]:
    return [TimingResult(case, mode, impl, ms, None if ms else "RuntimeError: boom") for impl, ms in times.items()]


def test_ratios_are_against_base_and_peft_in_the_same_case_and_mode():
    case = BenchCase(LayerShape("s", 4, 3), 2, 1)
    timings = synthetic_timings(case, FORWARD, {BASE: 2.0, PEFT: 3.0, FASTPEFT: 2.5, NAIVE: None})
    timings += synthetic_timings(case, FORWARD_BACKWARD, {BASE: 10.0, FASTPEFT: 11.0})
    rows = {(r.mode, r.impl): r for r in compute_metrics(timings)}
    assert rows[FORWARD, BASE].ratio_to_base == 1.0
    assert rows[FORWARD, FASTPEFT].ratio_to_base == pytest.approx(1.25)
    assert rows[FORWARD, FASTPEFT].speedup_vs_peft == pytest.approx(3.0 / 2.5)
    assert rows[FORWARD, NAIVE].ratio_to_base is None and rows[FORWARD, NAIVE].tflops is None
    assert rows[FORWARD_BACKWARD, FASTPEFT].ratio_to_base == pytest.approx(1.1)
    assert rows[FORWARD_BACKWARD, FASTPEFT].speedup_vs_peft is None  # PEFT not timed in this mode
    # 76 FLOPs in 1 ms; base counts no LoRA FLOPs (48 in 2 ms)
    assert compute_metrics(synthetic_timings(case, FORWARD, {FASTPEFT: 1.0}))[0].tflops == pytest.approx(76e3 / 1e12)
    assert rows[FORWARD, BASE].tflops == pytest.approx(48 / 2e-3 / 1e12)


def test_targets_apply_only_where_the_issue_states_them():
    small, large = BenchCase(TINY, 16, 8), BenchCase(TINY, 4096, 8)
    timings = []
    for case in (small, large):
        timings += synthetic_timings(case, FORWARD, {BASE: 1.0, FASTPEFT: 1.04})
        timings += synthetic_timings(case, FORWARD_BACKWARD, {BASE: 1.0, PEFT: 2.0, FASTPEFT: 1.2})
    checks = check_targets(compute_metrics(timings), dropout=0.05)
    forward = [c for c in checks if c.target.mode == FORWARD]
    assert [(c.case.m, c.met) for c in forward] == [(4096, True)]  # M >= 4096 only
    fwd_bwd = [(c.target.metric, c.case.m, c.met) for c in checks if c.target.mode == FORWARD_BACKWARD]
    assert ("ratio_to_base", 16, False) in fwd_bwd  # 1.2 > 1.15
    assert ("speedup_vs_peft", 4096, True) in fwd_bwd  # 2.0 / 1.2 >= 1.3
    assert all(c.target.metric != "speedup_vs_peft" for c in check_targets(compute_metrics(timings), dropout=0.1))


# --- timing ------------------------------------------------------------------------------


def test_median_time_calls_once_untimed_then_estimate_then_reps():
    calls = []
    budget = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=5, max_reps=5)
    ms = median_time_ms(lambda: calls.append(1), CPU, budget)
    assert ms >= 0.0
    assert len(calls) == 1 + 3 + 5  # prime, estimate, reps (no warm-up budget)


# --- run, JSON, report -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_analysis():
    impls = tuple(i for i in default_implementations() if i in (BASE, NAIVE, PEFT, FASTPEFT))
    config = BenchConfig(
        grid=CaseGrid((TINY,), (1, 5), (2,)), implementations=impls, device=CPU,
        dtype=torch.float32, dropout=0.05, budget=ONE_CALL,
    )
    return analyze(run_benchmark(config, log=lambda message: None))


def test_json_has_the_schema_and_every_case(tiny_analysis):
    data = json.loads(json.dumps(to_json_dict(tiny_analysis)))
    impls = tiny_analysis.run.settings["implementations"]
    assert data["schema"] == SCHEMA and data["interrupted"] is False
    for key in ("date", "device", "device_name", "torch", "triton", "peft", "fastpeft", "dtype", "dropout_fwd_bwd"):
        assert key in data["settings"]
    assert data["settings"]["dtype"] == "float32"
    assert len(data["timings"]) == 2 * 2 * len(impls)  # 2 cases x 2 modes
    assert len(data["saved_activations"]) == 2 * len(impls)
    for timing in data["timings"]:
        assert set(timing) == {"shape", "m", "n", "k", "r", "mode", "impl", "median_ms", "ratio_to_base",
                               "tflops", "speedup_vs_peft", "error"}
        assert timing["error"] is None and timing["median_ms"] > 0
    assert [c["passed"] for c in data["saved_activation_checks"]] == [True, True]
    assert not tiny_analysis.failed


def test_report_table_has_one_row_per_case_and_implementation(tiny_analysis):
    from fastpeft.bench.report import HEADERS, table_rows

    body = table_rows(tiny_analysis)
    assert len(body) == 2 * len(tiny_analysis.run.settings["implementations"])
    assert all(len(row) == len(HEADERS) for row in body)
    assert len(plain_table(HEADERS, body).splitlines()) == 2 + len(body)
    assert len(markdown_table(HEADERS, body).splitlines()) == 2 + len(body)


def test_run_records_a_failing_implementation_and_goes_on(monkeypatch):
    from fastpeft.bench import implementations

    def broken(weights, dropout_p, training):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setitem(implementations.BUILDERS, FASTPEFT, broken)
    config = BenchConfig(CaseGrid((TINY,), (3,), (2,)), (BASE, FASTPEFT), CPU, torch.float32, 0.05, ONE_CALL)
    analysis = analyze(run_benchmark(config, log=lambda message: None))
    assert [t.median_ms is not None for t in analysis.run.timings] == [True, False, True, False]
    assert analysis.run.errors[0].endswith("RuntimeError: kernel exploded")
    assert analysis.failed


def test_format_bytes():
    sizes = (0, 520, 2048, 1023 * 1024 + 1000, 3 * 2**20, 5 * 2**30)
    assert [format_bytes(n) for n in sizes] == ["0 B", "520 B", "2.0 KiB", "1024.0 KiB", "3.0 MiB", "5.0 GiB"]


# --- CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "q/o,bogus"], "unknown shape 'bogus'"),
        (["--m", "16,0"], "0 is not a positive integer"),
        (["--r", "x"], "is not an integer"),
        (["--dropout", "1.5"], "not in [0, 1)"),
        (["--impls", "naive,unsloth"], "unknown implementation 'unsloth'"),
        (["--m", ","], "expected a comma-separated list"),
        (["--json", "/nonexistent-dir/bench.json"], "directory /nonexistent-dir does not exist"),
    ],
)
def test_cli_rejects_bad_arguments_clearly(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{file}"], "{file} exists and is not a directory"),
        (["--out", "{file}/results"], "cannot create the directory (Not a directory)"),
        (["--json", "{dir}"], "is a directory"),
        (["--markdown", "{file}/bench.md"], "{file} is not a directory"),
    ],
)
def test_cli_rejects_unusable_output_paths_before_running(args, message, tmp_path, capsys):
    existing = tmp_path / "bench.json"
    existing.write_text("keep me")
    fill = {"file": str(existing), "dir": str(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", *(a.format(**fill) for a in args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastpeft bench") and message.format(**fill) in err
    assert existing.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only directories")
@pytest.mark.parametrize("option", ["--out", "--json"])
def test_cli_rejects_an_unwritable_directory(option, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = locked if option == "--out" else locked / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", option, str(target)])
    assert exit_info.value.code == 2
    assert f"cannot write in {locked} (Permission denied)" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs Linux's /sys, where nobody creates files")
def test_cli_rejects_an_out_directory_nobody_can_write(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", "/sys"])
    assert exit_info.value.code == 2
    assert "--out /sys: cannot write in /sys" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_cli_rejects_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_cli_quick_run_writes_json_markdown_and_plot(tmp_path, capsys):
    code = main(["--quick", "--device", "cpu", "--impls", "base,naive,fastpeft", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "PASS k/v M=16 r=8" in out
    assert json.loads((tmp_path / "bench.json").read_text())["schema"] == SCHEMA
    assert (tmp_path / "bench.md").read_text().startswith("# fastpeft bench")
    assert (tmp_path / "bench.png").stat().st_size > 0
