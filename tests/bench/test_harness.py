"""Fast CPU tests of the benchmark harness (fastpeft.bench): saved-activation accounting on
hand-computed cases, FLOP counts, ratios and their ranges, target verdicts on synthetic
timings, JSON schema, report tables, CLI errors. No test asserts on a measured time."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from fastpeft.bench.__main__ import main
from fastpeft.bench.analysis import Analysis, analyze
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, BenchCase, CaseGrid, LayerShape, lora_flops
from fastpeft.bench.export import SCHEMA, to_json_dict
from fastpeft.bench.implementations import (
    BASE, FASTPEFT, NAIVE, PEFT, build_implementation, default_implementations, random_weights,
)
from fastpeft.bench.memory import measure_saved_activations, saved_elements_limit, saved_mask_bytes_limit
from fastpeft.bench.report import (
    HEADERS, footer_lines, format_bytes, format_ms, markdown_table, plain_table, table_rows,
)
from fastpeft.bench.results import BenchRun, TimingResult, compute_metrics
from fastpeft.bench.runner import BenchConfig, make_inputs, run_benchmark
from fastpeft.bench.spread import INCONCLUSIVE, MET, MISSED, Spread, ratio, verdict
from fastpeft.bench.targets import check_targets
from fastpeft.bench.timing import TimingBudget
from tests.helpers.zygote import Zygote, give_to_nobody_if_root, reachable_temp_dir, run_as_nobody_if_root

CPU = torch.device("cpu")
TINY = LayerShape("tiny", 24, 40)  # K = 24, N = 40
ONE_CALL = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)
# Three timed calls: the fewest that give a median with quartiles around it.
THREE_CALLS = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)


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


def test_bool_storages_count_as_mask_bytes_not_elements():
    """mul by a bool mask saves the mask: 1 byte an element, counted apart from the elements."""
    x = torch.randn(3, 5, requires_grad=True)
    keep = torch.rand(3, 5) > 0.5
    saved = measure_saved_activations(lambda t: t * keep, x, owned=[])
    assert (saved.bytes, saved.elements, saved.mask_bytes, saved.storages) == (15, 0, 15, 1)


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
    assert saved.mask_bytes <= saved_mask_bytes_limit(case.m, case.shape.in_features)


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


def synthetic_timings(
    case: BenchCase, mode: str, times: dict[str, float | tuple[float, float, float] | None]
) -> list[TimingResult]:
    """TimingResults of ``case`` in ``mode``: an exact time, a (median, q1, q3) triple, or a failure."""
    results = []
    for impl, ms in times.items():
        if ms is None:
            results.append(TimingResult(case, mode, impl, None, error="RuntimeError: boom"))
        else:
            spread = Spread(*ms) if isinstance(ms, tuple) else Spread.point(ms)
            results.append(TimingResult(case, mode, impl, spread, reps=5))
    return results


def test_ratios_are_against_base_and_peft_in_the_same_case_and_mode():
    case = BenchCase(LayerShape("s", 4, 3), 2, 1)
    timings = synthetic_timings(case, FORWARD, {BASE: 2.0, PEFT: 3.0, FASTPEFT: 2.5, NAIVE: None})
    timings += synthetic_timings(case, FORWARD_BACKWARD, {BASE: 10.0, FASTPEFT: 11.0})
    rows = {(r.mode, r.impl): r for r in compute_metrics(timings)}
    assert rows[FORWARD, BASE].ratio_to_base == Spread.point(1.0)
    assert rows[FORWARD, FASTPEFT].ratio_to_base.value == pytest.approx(1.25)
    assert rows[FORWARD, FASTPEFT].speedup_vs_peft.value == pytest.approx(3.0 / 2.5)
    assert rows[FORWARD, NAIVE].ratio_to_base is None and rows[FORWARD, NAIVE].tflops is None
    assert rows[FORWARD_BACKWARD, FASTPEFT].ratio_to_base.value == pytest.approx(1.1)
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
    assert [(c.case.m, c.verdict) for c in forward] == [(4096, MET)]  # M >= 4096 only
    fwd_bwd = [(c.target.metric, c.case.m, c.verdict) for c in checks if c.target.mode == FORWARD_BACKWARD]
    assert ("ratio_to_base", 16, MISSED) in fwd_bwd  # 1.2 > 1.15
    assert ("speedup_vs_peft", 4096, MET) in fwd_bwd  # 2.0 / 1.2 >= 1.3
    assert all(c.target.metric != "speedup_vs_peft" for c in check_targets(compute_metrics(timings), dropout=0.1))


# --- spreads and verdicts ----------------------------------------------------------------


def test_spread_of_samples_is_the_median_and_interquartile_range():
    assert Spread.of_samples([4.0, 1.0, 100.0, 3.0, 2.0]) == Spread(3.0, 2.0, 4.0)  # the outlier moves nothing
    assert Spread.of_samples([1.0, 2.0, 4.0]) == Spread(2.0, 1.5, 3.0)
    assert Spread.of_samples([7.0]) == Spread.point(7.0)
    with pytest.raises(ValueError, match="no samples"):
        Spread.of_samples([])


def test_ratio_spans_the_extremes_of_both_ranges():
    got = ratio(Spread(2.0, 1.8, 2.4), Spread(1.0, 0.9, 1.2))
    assert got.value == 2.0 and got.low == pytest.approx(1.8 / 1.2) and got.high == pytest.approx(2.4 / 0.9)
    assert ratio(Spread.point(3.0), Spread.point(2.0)) == Spread.point(1.5)
    assert ratio(None, Spread.point(1.0)) is None and ratio(Spread.point(1.0), None) is None
    assert Spread(2.0, 1.0, 4.0).rate(8.0) == Spread(4.0, 2.0, 8.0)  # 8 / time: the bounds swap


@pytest.mark.parametrize(
    ("low", "high", "limit", "at_most", "expected"),
    [
        (1.00, 1.05, 1.05, True, MET),  # the whole range <= the limit, touching it
        (1.05, 1.05, 1.05, True, MET),  # an exact value on the limit meets it
        (1.04, 1.06, 1.05, True, INCONCLUSIVE),  # straddles
        (1.05, 1.10, 1.05, True, INCONCLUSIVE),  # starts on the limit: part of it meets
        (1.0501, 1.10, 1.05, True, MISSED),
        (1.30, 1.50, 1.3, False, MET),
        (1.20, 1.30, 1.3, False, INCONCLUSIVE),  # ends on the limit
        (1.10, 1.2999, 1.3, False, MISSED),
        (1.29, 1.31, 1.3, False, INCONCLUSIVE),
    ],
)
def test_verdict_at_the_boundaries(low, high, limit, at_most, expected):
    assert verdict(Spread((low + high) / 2, low, high), limit, at_most) == expected


def test_a_median_that_meets_a_target_with_a_straddling_range_is_inconclusive():
    """The forward target (<= 1.05x base at M >= 4096) on three noisy cases: the ratio of the
    medians is 1.04x in each, only the ranges differ."""
    narrow, noisy, slow = BenchCase(TINY, 4096, 8), BenchCase(TINY, 8192, 8), BenchCase(TINY, 16384, 8)
    timings = synthetic_timings(narrow, FORWARD, {BASE: (1.0, 0.999, 1.001), FASTPEFT: (1.04, 1.039, 1.041)})
    timings += synthetic_timings(noisy, FORWARD, {BASE: (1.0, 0.98, 1.02), FASTPEFT: (1.04, 1.03, 1.05)})
    timings += synthetic_timings(slow, FORWARD, {BASE: (1.0, 0.99, 1.01), FASTPEFT: (1.09, 1.08, 1.10)})
    checks = {c.case.m: c for c in check_targets(compute_metrics(timings), dropout=0.05)}
    assert checks[4096].verdict == MET  # [1.038, 1.042]
    assert checks[8192].verdict == INCONCLUSIVE  # [1.010, 1.071] reaches over 1.05
    assert checks[8192].value.value == pytest.approx(1.04)
    assert checks[16384].verdict == MISSED  # [1.069, 1.111]


def synthetic_analysis(timings: list[TimingResult]) -> Analysis:
    """An Analysis of ``timings`` alone (no saved-activation measurements)."""
    settings = {"dropout_fwd_bwd": 0.05, "dropout_saved_activations": 0.1}
    return analyze(BenchRun(settings, timings))


def test_table_and_footer_show_the_ranges_and_verdicts():
    case = BenchCase(TINY, 8192, 8)
    timings = synthetic_timings(case, FORWARD, {BASE: (1.0, 0.98, 1.02), FASTPEFT: (1.04, 1.03, 1.05)})
    timings += synthetic_timings(case, FORWARD_BACKWARD, {BASE: 2.0, PEFT: 3.0, FASTPEFT: 2.2})
    body = {row[3]: row for row in table_rows(synthetic_analysis(timings))}
    column = {name: HEADERS.index(name) for name in ("fwd ms", "fwd x base", "f+b x base", "f+b vs PEFT")}
    assert body[FASTPEFT][column["fwd ms"]] == "1.04 (1.03-1.05)"
    assert body[FASTPEFT][column["fwd x base"]] == "1.04x (1.01-1.07) ?"
    assert body[FASTPEFT][column["f+b x base"]] == "1.10x ✓"  # exact times: no range, a verdict
    assert body[FASTPEFT][column["f+b vs PEFT"]] == "1.36x ✓"
    assert body[BASE][column["fwd x base"]] == "1.00x"  # itself: no spread; no target on base: no mark
    assert body[PEFT][column["f+b vs PEFT"]] == "1.00x"
    footer = "\n".join(footer_lines(synthetic_analysis(timings)))
    assert "forward <= 1.05x base F.linear at M >= 4096: met in 0/1 cases, missed in 0, inconclusive in 1" in footer
    assert "(worst 1.04x (1.01-1.07) at tiny M=8192 r=8)" in footer


def test_format_ms_keeps_three_significant_digits_without_an_exponent():
    times = (0.0123456, 0.5123, 0.53, 12.34, 1234.5)
    assert [format_ms(x) for x in times] == ["0.0123", "0.512", "0.530", "12.3", "1234"]


# --- run, JSON, report -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_analysis():
    impls = tuple(i for i in default_implementations() if i in (BASE, NAIVE, PEFT, FASTPEFT))
    config = BenchConfig(
        grid=CaseGrid((TINY,), (1, 5), (2,)), implementations=impls, device=CPU,
        dtype=torch.float32, dropout=0.05, budget=THREE_CALLS,
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
        assert set(timing) == {"shape", "m", "n", "k", "r", "mode", "impl", "ms", "reps", "ratio_to_base",
                               "tflops", "speedup_vs_peft", "error"}
        assert timing["error"] is None and timing["reps"] == 3
        ms, to_base = timing["ms"], timing["ratio_to_base"]
        assert set(ms) == set(to_base) == {"value", "low", "high"}
        assert 0 < ms["low"] <= ms["value"] <= ms["high"]
        assert to_base["low"] <= to_base["value"] <= to_base["high"]
    for target in data["targets"]:
        assert target["verdict"] in (MET, MISSED, INCONCLUSIVE) and set(target["value"]) == {"value", "low", "high"}
    assert [c["passed"] for c in data["saved_activation_checks"]] == [True, True]
    assert not tiny_analysis.failed


def test_report_table_has_one_row_per_case_and_implementation(tiny_analysis):
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
    assert [t.ms is not None for t in analysis.run.timings] == [True, False, True, False]
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


@pytest.fixture(scope="module")
def zygote():
    server = Zygote("tests.bench.test_harness")
    yield server
    server.close()


def _child_cli_exit(args: list[str]) -> dict:
    """In a zygote child, as "nobody" when the tests run as root: the bench CLI's exit code and
    stderr for ``args``."""
    run_as_nobody_if_root()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    return {"code": code, "stderr": err.getvalue()}


@pytest.mark.parametrize("option", ["--out", "--json"])
def test_cli_rejects_an_unwritable_directory(option, zygote):
    """Run by an unprivileged user: "nobody" when the tests run as root, who writes in
    read-only directories."""
    with reachable_temp_dir("fastpeft-bench-") as root:
        locked = root / "locked"
        locked.mkdir(mode=0o500)
        give_to_nobody_if_root(locked)
        target = locked if option == "--out" else locked / "bench.json"
        outcome = zygote.run("_child_cli_exit", args=["--quick", option, str(target)])
        assert not any(locked.iterdir())
    assert outcome["code"] == 2
    assert f"cannot write in {locked} (Permission denied)" in outcome["stderr"]


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
    assert "ms: median (interquartile range) of the timed calls" in out
    assert json.loads((tmp_path / "bench.json").read_text())["schema"] == SCHEMA
    assert (tmp_path / "bench.md").read_text().startswith("# fastpeft bench")
    assert (tmp_path / "bench.png").stat().st_size > 0
