"""Fast CPU tests of the bottleneck-adapter and multi-LoRA benchmarks (fastpeft.bench.bottleneck,
multi_lora, op_bench, op_runs, roofline): every row computes the op's result on the same
weights (so the comparison is apples to apples), ratios / metrics / verdicts on synthetic
timings, the table and JSON, skipped and failing rows, the CLI's --ops. No test asserts on a
measured time."""

from __future__ import annotations

import argparse

import pytest
import torch

from fastpeft.bench import bottleneck, dora, multi_lora, op_runs
from fastpeft.bench.__main__ import build_parser, main, selected_ops
from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD
from fastpeft.bench.op_bench import (
    ERROR, OK, SKIPPED, OpRow, OpRun, OpTiming, analyze_op, op_json, op_report_markdown, op_report_text, op_table,
    run_op_benchmark,
)
from fastpeft.bench.roofline import achieved_gb_s, fraction_of_peak, peak_bandwidth_gb_s
from fastpeft.bench.spread import INCONCLUSIVE, MET, MISSED, Spread
from fastpeft.bench.timing import TimingBudget
from fastpeft.kernels.bottleneck.ref import bottleneck_adapter_ref
from fastpeft.kernels.multi_lora.ref import multi_lora_linear_ref
from tests.helpers.numerics import assert_close

CPU = torch.device("cpu")
ONE_CALL = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --- the rows compute the same thing ----------------------------------------------------------


@pytest.mark.parametrize("case", [bottleneck.BottleneckCase(1, 40, 3), bottleneck.BottleneckCase(7, 24, 8)],
                         ids=lambda c: c.label)
def test_bottleneck_rows_equal_the_reference_forward_and_gradients(case):
    """naive (AdapterHub's structure) and the op's torch path give the float64 reference's
    output and the gradients of h and all four adapter tensors (compile is the naive module
    compiled; it runs in the CLI test and on the GPU)."""
    p = bottleneck.make_problem(case, torch.float64, CPU, generator())
    want = bottleneck_adapter_ref(p.h, *p.params, activation=bottleneck.ACTIVATION, scaling=bottleneck.SCALING)
    want_grads = torch.autograd.grad(want, (p.h, *p.params), p.grad_out)
    for name in (bottleneck.NAIVE, bottleneck.TORCH):
        row = bottleneck.SPEC.row(name)
        out = row.build(p, FORWARD)()
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=name)
        grads = row.build(p, FORWARD_BACKWARD)()
        assert len(grads) == 5
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)


def test_adapterhub_module_shares_the_problems_weights():
    p = bottleneck.make_problem(bottleneck.BottleneckCase(2, 16, 4), torch.float32, CPU, generator())
    module = bottleneck.AdapterHubAdapter.sharing(p)
    names = [n for n, _ in module.named_parameters()]
    assert names == ["adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"]
    assert [t.data_ptr() for t in module.parameters()] == [t.data_ptr() for t in p.params]


MULTI_CASES = [
    multi_lora.MultiLoRACase(5, 24, 4, 3, multi_lora.DISTINCT),
    multi_lora.MultiLoRACase(9, 20, multi_lora.MIXED, 5, multi_lora.ZIPF),
    multi_lora.MultiLoRACase(6, 16, 2, 1, multi_lora.UNIFORM),
]


@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: c.label)
def test_multi_lora_rows_equal_the_per_token_reference(case):
    """PEFT's mixed batch, the loop, the padded-rank bmm and fastpeft's torch path all give the
    per-token float64 reference (mixed ranks and zipf ids included)."""
    p = multi_lora.make_problem(case, torch.float64, CPU, generator())
    want = multi_lora_linear_ref(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scalings, p.ids, p.ranks)
    delta = (want - torch.nn.functional.linear(p.x, p.weight, p.bias)).abs().max()
    assert delta > 1e-3  # the LoRA term is not timed on zeros
    for name in (multi_lora.PEFT, multi_lora.LOOP, multi_lora.PADDED, multi_lora.TORCH):
        got = multi_lora.SPEC.row(name).build(p, FORWARD)()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", [dora.DoRACase(5, 24, 4, 0.0), dora.DoRACase(9, 16, 2, 0.0)], ids=lambda c: c.label)
def test_dora_rows_compute_the_same_layer(case):
    """On the same weights fastpeft's DoRA layer gives PEFT's DoRA output and the gradients of
    x, A, B and the magnitude; fastpeft's LoRA layer gives PEFT's LoRA's; DoRA's output differs
    from LoRA's (the magnitude is off the norms: the rows do not time the same math). The
    adapter is fp32 (PEFT's default) on a float64 base: fp32 tolerance."""
    p = dora.make_problem(case, torch.float64, CPU, generator())
    names = (dora.TORCH, dora.PEFT, dora.LORA, dora.PEFT_LORA)
    for mode, counts in ((FORWARD, (1, 1)), (FORWARD_BACKWARD, (4, 3))):
        results = {}
        for name in names:
            result = dora.SPEC.row(name).build(p, mode)()
            results[name] = result if isinstance(result, tuple) else (result,)
        for (ours, theirs), count in zip(((dora.TORCH, dora.PEFT), (dora.LORA, dora.PEFT_LORA)), counts):
            assert len(results[ours]) == len(results[theirs]) == count
            for got, want in zip(results[ours], results[theirs]):
                assert_close(got, want, torch.float32, f"{ours} vs {theirs}, {mode}")
        if mode == FORWARD:
            assert not torch.allclose(results[dora.TORCH][0], results[dora.LORA][0])


def test_multi_lora_ids_follow_the_popularity():
    g = generator()
    distinct = multi_lora.adapter_ids(multi_lora.MultiLoRACase(10, 8, 4, 4, multi_lora.DISTINCT), CPU, g)
    assert distinct.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    zipf = multi_lora.adapter_ids(multi_lora.MultiLoRACase(4000, 8, 4, 64, multi_lora.ZIPF), CPU, g)
    uniform = multi_lora.adapter_ids(multi_lora.MultiLoRACase(4000, 8, 4, 64, multi_lora.UNIFORM), CPU, g)
    assert 0 <= zipf.min() and zipf.max() < 64 and 0 <= uniform.min() and uniform.max() < 64
    # zipf(1.5): adapter 0 has 1 / zeta-ish ~ 39% of 64 adapters' mass; uniform ~ 1.6%
    assert (zipf == 0).float().mean() > 0.3 and (uniform == 0).float().mean() < 0.05


def test_multi_lora_grid_drops_duplicate_single_adapter_cases():
    cases = multi_lora.grid((1, 64), 32, (16, multi_lora.MIXED), (1, 8), multi_lora.POPULARITIES)
    single = [c for c in cases if c.adapters == 1]
    assert [(c.t, c.rank, c.popularity) for c in single] == [(1, 16, "distinct"), (64, 16, "distinct")]
    assert len(cases) == 2 + 2 * 2 * 3
    assert multi_lora.MultiLoRACase(1, 8, multi_lora.MIXED, 5, "distinct").ranks() == [8, 16, 32, 64, 8]


# --- analysis, table and JSON on synthetic timings ------------------------------------------


def synthetic_bottleneck_run(peak: float | None = 4800.0) -> OpRun:
    """M=8192 D=4096 R=64 and M=1: times chosen to hit each verdict."""
    big, small = bottleneck.BottleneckCase(8192, 4096, 64), bottleneck.BottleneckCase(1, 4096, 64)
    settings = bottleneck.settings(CPU, torch.bfloat16, peak)
    run = OpRun(bottleneck.SPEC, settings)

    def add(case, mode, row, low, value, high, status=OK, error=None):
        run.timings.append(OpTiming(case, mode, row, status, Spread(value, low, high) if status == OK else None,
                                    10, error))

    add(big, FORWARD, bottleneck.NAIVE, 0.30, 0.31, 0.32)
    add(big, FORWARD, bottleneck.TRITON, 0.0290, 0.0300, 0.0310)
    add(big, FORWARD_BACKWARD, bottleneck.NAIVE, 1.0, 1.0, 1.0)
    add(big, FORWARD_BACKWARD, bottleneck.TRITON, 0.40, 0.45, 0.55)  # 2.2x (1.82-2.5): inconclusive
    add(big, FORWARD_BACKWARD, bottleneck.TORCH, 0.90, 0.95, 0.99)  # ~1.05x: missed
    add(big, FORWARD_BACKWARD, bottleneck.CUDA, 0, 0, 0, status=SKIPPED, error="needs a CUDA device")
    add(small, FORWARD, bottleneck.LAUNCH, 0.0050, 0.0050, 0.0050)
    add(small, FORWARD, bottleneck.TRITON, 0.0055, 0.0056, 0.0057)  # 1.12x (1.10-1.14): met
    add(small, FORWARD, bottleneck.TORCH, 0, 0, 0, status=ERROR, error="RuntimeError: boom")
    return run


def test_bottleneck_ratios_bandwidth_and_verdicts():
    analysis = analyze_op(synthetic_bottleneck_run())
    verdicts = {(c.target.metric, c.target.limit, c.timing.row, c.timing.mode): c.verdict for c in analysis.checks}
    assert verdicts == {
        (bottleneck.VS_NAIVE, 2.0, bottleneck.TRITON, FORWARD_BACKWARD): INCONCLUSIVE,
        (bottleneck.VS_NAIVE, 2.0, bottleneck.TORCH, FORWARD_BACKWARD): MISSED,
        # the torch path's own target: no slower than naive anywhere (1.05x, 1.01-1.11)
        (bottleneck.VS_NAIVE, 1.0, bottleneck.TORCH, FORWARD_BACKWARD): MET,
        (bottleneck.ROOFLINE, 0.70, bottleneck.TRITON, FORWARD): MET,
        (bottleneck.X_LAUNCH, 1.2, bottleneck.TRITON, FORWARD): MET,
    }
    fwd = next(r for r in analysis.rows if r.timing.row == bottleneck.TRITON and r.timing.mode == FORWARD
               and r.timing.case.m == 8192)
    nbytes = bottleneck.bytes_moved(fwd.timing.case, FORWARD, 2)
    assert nbytes == 2 * 8192 * 4096 * 2 + (2 * 4096 * 64 + 64 + 4096) * 2
    gb_s = fwd.metrics[bottleneck.GB_S]
    assert gb_s.value == pytest.approx(nbytes / 0.0300 / 1e6) and gb_s.low == pytest.approx(nbytes / 0.0310 / 1e6)
    assert fwd.metrics[bottleneck.ROOFLINE].value == pytest.approx(gb_s.value / 4800)
    speedup = fwd.ratios[bottleneck.VS_NAIVE]
    assert (speedup.value, speedup.low, speedup.high) == pytest.approx((0.31 / 0.03, 0.30 / 0.031, 0.32 / 0.029))
    assert analysis.failed  # the torch row's error


def test_no_roofline_without_a_known_peak():
    analysis = analyze_op(synthetic_bottleneck_run(peak=None))
    assert all(r.metrics[bottleneck.ROOFLINE] is None for r in analysis.rows)
    assert all(c.target.metric != bottleneck.ROOFLINE for c in analysis.checks)


def test_table_footer_and_json_show_ranges_verdicts_skips_and_errors():
    analysis = analyze_op(synthetic_bottleneck_run())
    headers, body, text_columns = op_table(analysis)
    assert headers[:6] == ["M", "D", "R", "mode", "impl", "ms"] and text_columns == 5
    assert len(body) == len(analysis.run.timings)
    triton_fb = next(row for row in body if row[3] == FORWARD_BACKWARD and row[4] == bottleneck.TRITON)
    assert triton_fb[5] == "0.450 (0.400-0.550)" and triton_fb[6] == "2.22x (1.82-2.50) ?"
    text = op_report_text(analysis)
    assert "skipped cuda: needs a CUDA device" in text and "RuntimeError: boom" in text
    assert "[triton]: met 0/1, missed 0, inconclusive 1" in text
    assert "## Bottleneck adapter" in op_report_markdown(analysis)
    data = op_json(analysis)
    assert set(data) == {"settings", "interrupted", "rows", "timings", "targets"}
    cell = data["timings"][1]
    assert cell["ms"] == {"value": 0.03, "low": 0.029, "high": 0.031} and cell["status"] == OK
    assert set(cell["ratios"]) == {bottleneck.VS_NAIVE, bottleneck.X_LAUNCH}
    assert {t["verdict"] for t in data["targets"]} == {MET, MISSED, INCONCLUSIVE}


def test_multi_lora_targets_apply_where_the_issue_states_them():
    case = multi_lora.MultiLoRACase(64, 4096, 16, 64, multi_lora.DISTINCT)
    other = multi_lora.MultiLoRACase(64, 4096, 16, 8, multi_lora.ZIPF)
    run = OpRun(multi_lora.SPEC, multi_lora.settings(torch.bfloat16))
    for c in (case, other):
        for row, ms in ((multi_lora.BASE, 1.0), (multi_lora.PEFT, 30.0), (multi_lora.LOOP, 20.0),
                        (multi_lora.TRITON, 1.1)):
            run.timings.append(OpTiming(c, FORWARD, row, OK, Spread(ms, ms * 0.98, ms * 1.02), 5))
    analysis = analyze_op(run)
    labels = {(c.target.label.split(" (")[0], c.timing.case.adapters): c.verdict for c in analysis.checks}
    assert labels == {("<= 1.15x base linear at T=64, 64 distinct adapters, r 16", 64): MET,
                      (">= 10x PEFT's mixed batch", 64): MET, (">= 10x PEFT's mixed batch", 8): MET}
    row = next(r for r in analysis.rows if r.timing.row == multi_lora.TRITON)
    assert row.ratios[multi_lora.VS_PEFT].value == pytest.approx(30 / 1.1)
    assert row.ratios[multi_lora.X_BASE].value == pytest.approx(1.1)


def test_roofline_peaks_and_rates():
    assert peak_bandwidth_gb_s("NVIDIA H200") == 4800.0
    assert peak_bandwidth_gb_s("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth_gb_s("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth_gb_s("NVIDIA A100-SXM4-80GB") == 2039.0
    assert peak_bandwidth_gb_s("Intel Xeon") is None
    rate = achieved_gb_s(2_000_000, Spread(1.0, 0.5, 2.0))  # 2 MB in 1 ms = 2 GB/s
    assert (rate.value, rate.low, rate.high) == (2.0, 1.0, 4.0)
    assert fraction_of_peak(rate, 4.0) == Spread(0.5, 0.25, 1.0)


# --- the runner --------------------------------------------------------------------------------


def test_run_skips_unavailable_rows_records_failures_and_goes_on():
    case = bottleneck.BottleneckCase(1, 16, 2)
    broken = OpRow("broken", "raises", lambda p, mode: (_ for _ in ()).throw(RuntimeError("nope\nmore")))
    absent = OpRow("absent", "unavailable", lambda p, mode: None, unavailable=lambda device: "not here")
    spec = bottleneck.SPEC.__class__(**{**vars(bottleneck.SPEC), "rows": (*bottleneck.ROWS, broken, absent)})
    rows = (bottleneck.NAIVE, "broken", "absent", bottleneck.TORCH, bottleneck.LAUNCH)
    run = run_op_benchmark(spec, [case], rows, CPU, torch.float32, ONE_CALL, {"element_size": 4}, log=lambda m: None)
    status = {(t.mode, t.row): (t.status, t.error) for t in run.timings}
    assert status[(FORWARD, "broken")] == (ERROR, "RuntimeError: nope")
    assert status[(FORWARD, "absent")] == (SKIPPED, "not here")
    assert status[(FORWARD_BACKWARD, bottleneck.TORCH)][0] == OK
    assert (FORWARD_BACKWARD, bottleneck.LAUNCH) not in status  # the floor is timed in the forward only
    assert status[(FORWARD, bottleneck.LAUNCH)][0] == OK


def test_kernel_rows_are_skipped_with_the_reason_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests' interpreter would run the Triton rows on CPU
    for spec in (bottleneck.SPEC, multi_lora.SPEC):
        for name in ("triton", "cuda"):
            assert "CUDA device" in spec.row(name).unavailable(CPU)


def test_interrupt_keeps_what_was_measured(monkeypatch):
    cases = [multi_lora.MultiLoRACase(2, 8, 2, 2, multi_lora.DISTINCT),
             multi_lora.MultiLoRACase(3, 8, 2, 2, multi_lora.DISTINCT)]
    real = multi_lora.make_problem

    def interrupt_second(case, *args):
        if case is cases[1]:
            raise KeyboardInterrupt
        return real(case, *args)

    spec = multi_lora.SPEC.__class__(**{**vars(multi_lora.SPEC), "make_problem": interrupt_second})
    rows = (multi_lora.BASE, multi_lora.TORCH)
    run = run_op_benchmark(spec, cases, rows, CPU, torch.float32, ONE_CALL, {}, log=lambda m: None)
    assert run.interrupted and analyze_op(run).failed
    assert [t.status for t in run.timings] == [OK, OK, SKIPPED, SKIPPED]
    assert run.timings[2].error == "interrupted"


# --- the command line --------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_ops_selection():
    assert selected_ops(parse()) == op_runs.OPS
    assert selected_ops(parse("--quick")) == op_runs.OPS
    assert selected_ops(parse("--m", "16")) == (op_runs.LORA,)  # a LoRA grid option: LoRA only
    assert selected_ops(parse("--ops", "multi-lora,bottleneck,multi-lora")) == ("multi-lora", "bottleneck")


def test_cli_rejects_an_unknown_op(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--ops", "ia3"])
    assert exc.value.code == 2 and "unknown op 'ia3'" in capsys.readouterr().err


def test_cli_runs_the_chosen_ops_only(monkeypatch, tmp_path, capsys):
    """--ops multi-lora --quick: the multi-LoRA table and JSON section, no LoRA grid (tiny cases)."""
    tiny = (multi_lora.MultiLoRACase(4, 16, 2, 2, multi_lora.DISTINCT),)
    monkeypatch.setitem(op_runs.GRIDS, op_runs.MULTI_LORA,
                        op_runs.GRIDS[op_runs.MULTI_LORA].__class__(
                            **{**vars(op_runs.GRIDS[op_runs.MULTI_LORA]), "quick": tiny}))
    assert main(["--quick", "--ops", "multi-lora", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "Multi-LoRA mixed batch" in out and "shape" not in out.split("Multi-LoRA")[0]
    import json

    data = json.loads((tmp_path / "b.json").read_text())
    assert set(data) == {"schema", "ops"} and set(data["ops"]) == {"multi-lora"}
    assert {t["impl"] for t in data["ops"]["multi-lora"]["timings"]} == set(multi_lora.ROW_NAMES)
