"""``fastpeft plan`` (fastpeft/plan/): the rows and their fields, grids and tiles equal to what
the launchers launch (cross-checked with the test suite's own launch recorder), the minimum
bytes and FLOPs and one kernel's traffic by hand, the command line, and the comparison with a
focused benchmark's JSON."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from fastpeft.kernels import launch_device  # noqa: E402
from fastpeft.kernels.bottleneck import configs as bn_configs, launch as bn_launch  # noqa: E402
from fastpeft.kernels.lora import configs as lora_configs, hybrid_launch, launch as lora_launch  # noqa: E402
from fastpeft.kernels.multi_lora import launch as ml_launch  # noqa: E402
from fastpeft.kernels.quant import launch as quant_launch  # noqa: E402
from fastpeft.plan import GPUS, build_plan, compare_lines, kernel_costs, model, paths, problems  # noqa: E402
from fastpeft.plan.problems import BOTTLENECK, FWD, FWD_BWD, LORA, MULTI_LORA, QLORA, Problem  # noqa: E402
from fastpeft.plan.recording import Launch, kernel_name, recording  # noqa: E402
from fastpeft.plan.traffic import Hardware  # noqa: E402
from tests.helpers.cli_runner import run_cli  # noqa: E402
from tests.helpers.launch_recorder import record_launches  # noqa: E402

# The fields issue 19 asks for in every row, plus the launch function that gave the grid.
ISSUE_FIELDS = {"op", "M", "K", "N", "r", "dtype", "path", "kernel", "ctas", "waves", "bytes", "min_bytes", "flops",
                "roofline_us", "est_us", "source"}
H100 = GPUS["h100"]


@pytest.fixture(scope="module")
def h100_rows() -> list[model.PlanRow]:
    return build_plan(H100)


def test_rows_cover_every_key_shape_with_the_issue_fields(h100_rows):
    problems_ = [r.problem for r in h100_rows]
    assert {p.op for p in problems_} == {LORA, QLORA, BOTTLENECK, MULTI_LORA}
    lora = {(p.m, p.k, p.n, p.r) for p in problems_ if p.op == LORA}
    assert lora == {(m, k, n, rank) for m in (1, 16, 64, 512, 4096, 16384) for k, n in ((4096, 4096), (4096, 14336))
                    for rank in (8, 16, 64)}
    assert {(p.m, p.r) for p in problems_ if p.op == BOTTLENECK} >= {(m, r) for m in (1, 8192) for r in (64, 256)}
    assert {(p.m, p.adapters) for p in problems_ if p.op == MULTI_LORA} == {(1, 64), (16, 64), (64, 64)}
    assert {(p.m, p.k, p.n, p.r) for p in problems_ if p.op == QLORA} == {
        (m, k, n, 16) for m in (1, 16, 64, 512, 4096) for k, n in ((4096, 4096), (4096, 14336))}
    for row in h100_rows:
        data = row.as_json()
        assert ISSUE_FIELDS <= set(data), ISSUE_FIELDS - set(data)
        assert data["kernels"] and all(k["est_us"] > 0 for k in data["kernels"])
        json.dumps(data)  # plain data


def test_bytes_are_at_least_the_minimum_and_l2_reuse_only_removes_reads(h100_rows):
    for row in h100_rows:
        assert row.min_bytes <= row.l2_bytes <= row.bytes, row
        assert row.est_us <= row.est_no_l2_us
        assert row.est_us >= row.launches * model.LAUNCH_US
        assert row.roofline_us > 0 and row.flops > 0


def test_who_picks_each_path(h100_rows):
    by_problem: dict[Problem, list[model.PlanRow]] = {}
    for row in h100_rows:
        by_problem.setdefault(row.problem, []).append(row)
    for problem, rows in by_problem.items():
        auto = [r for r in rows if "auto" in r.choice.split(",")]
        validated = [r for r in rows if "validated" in r.choice.split(",")]
        assert len(auto) == 1 and auto[0].path == "torch"  # the kernels are not validated on a GPU yet
        assert len(validated) == 1
        if problem.op == LORA:  # the shipped dispatch table's rules of thumb
            assert validated[0].path == ("fused" if problem.m <= 16 else "hybrid")
        if problem.op == QLORA:  # the kernels: the decode kernel or the dequantization + the LoRA table's path
            assert validated[0].path == "triton"
        # torch rows have no grid of their own; every kernel row names its main Triton launch
        for r in rows:
            assert (r.ctas is None) == (r.path == "torch")
            assert r.path == "torch" or r.kernel.endswith("_kernel") and r.source.startswith("fastpeft.kernels.")


def _summary(name: str, grid: tuple[int, ...], named: dict) -> tuple:
    """A launch as (kernel, grid, its non-tensor arguments and constexprs, its tensors' shapes
    and dtypes, and its TMA descriptors' shapes, strides, blocks and dtypes)."""
    values = {k: v for k, v in named.items() if not isinstance(v, (torch.Tensor, TensorDescriptor))}
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in named.items() if isinstance(v, torch.Tensor)}
    shapes |= {k: (tuple(v.shape), tuple(v.strides), tuple(v.block_shape), v.base.dtype) for k, v in named.items()
               if isinstance(v, TensorDescriptor)}
    return name, tuple(grid), values, shapes


def _helper_launches(monkeypatch, gpu, run: paths.PathRun) -> list[tuple]:
    """The Triton launches of ``run`` recorded by the tests' own recorder (as the spec tests do)."""
    recorded = record_launches(monkeypatch, lora_launch, hybrid_launch, bn_launch, ml_launch, quant_launch)
    for module in (lora_configs, lora_launch, bn_configs, hybrid_launch):
        monkeypatch.setattr(module, "device_info", lambda device: (gpu.sms, gpu.capability))
    for module in (launch_device, bn_launch):
        monkeypatch.setattr(module, "interpreting", lambda: False)
    run.run()
    return [_summary(kernel_name(fn), grid, {**dict(zip(fn.arg_names, args)), **kwargs})
            for (fn, args, kwargs), grid in zip(recorded, recorded.grids)]


def _plan_launches(gpu, run: paths.PathRun) -> list[tuple]:
    with recording(gpu) as launches:
        run.run()
    return [_summary(launch.name, launch.grid, dict(launch.params)) for launch in launches if launch.is_triton]


CROSS_CHECKED = [
    *(Problem(LORA, FWD_BWD, m, 4096, n, 16, torch.bfloat16, torch.float32) for m in (16, 512, 4096)
      for n in (4096, 14336)),
    Problem(LORA, FWD, 64, 4096, 4096, 64, torch.bfloat16, torch.float32),
    *(Problem(BOTTLENECK, FWD_BWD, m, 4096, 4096, r, torch.bfloat16, torch.bfloat16) for m in (1, 8192)
      for r in (64, 256)),
    *(Problem(MULTI_LORA, FWD, t, 4096, 4096, 16, torch.bfloat16, torch.bfloat16, 64) for t in (1, 64)),
    *(Problem(QLORA, mode, m, 4096, 14336, 16, torch.bfloat16, torch.float32) for m in (1, 512)
      for mode in (FWD, FWD_BWD)),
]


@pytest.mark.parametrize("gpu", ["h100", "a100"])
@pytest.mark.parametrize("problem", CROSS_CHECKED, ids=lambda p: f"{p.op}-{p.mode}-M{p.m}-N{p.n}-r{p.r}")
def test_grids_and_tiles_are_what_the_launchers_launch(monkeypatch, gpu, problem):
    spec = GPUS[gpu]
    for run in paths.paths(problem, spec):
        if run.path == "torch":
            continue
        planned = _plan_launches(spec, run)
        with monkeypatch.context() as patch:
            expected = _helper_launches(patch, spec, run)
        assert planned and planned == expected, run.path


def test_min_bytes_and_flops_by_hand():
    lora = Problem(LORA, FWD, 16, 4096, 4096, 16, torch.bfloat16, torch.float32)
    # x [16, 4096] and y [16, 4096] bf16, W [4096, 4096] bf16, A [16, 4096] and B [4096, 16] fp32
    assert lora.min_bytes() == (16 * 4096 + 4096 * 4096 + 16 * 4096) * 2 + (16 * 4096 + 4096 * 16) * 4 == 34_340_864
    assert lora.flops() == 2 * 16 * 4096 * 4096 + 2 * (2 * 16 * 4096 * 16) == 541_065_216
    bottleneck = Problem(BOTTLENECK, FWD, 8192, 4096, 4096, 64, torch.bfloat16, torch.bfloat16)
    # h read and out written (bf16), W_down [64, 4096], W_up [4096, 64], b_down [64], b_up [4096] (bf16)
    assert bottleneck.min_bytes() == 2 * 8192 * 4096 * 2 + (2 * 64 * 4096 + 64 + 4096) * 2
    assert bottleneck.flops() == 2 * (2 * 8192 * 4096 * 64)
    multi = Problem(MULTI_LORA, FWD, 16, 4096, 4096, 16, torch.bfloat16, torch.bfloat16, 64)
    # 16 tokens with distinct adapters: 16 adapters' A and B read once
    assert multi.min_bytes() == (16 * 4096 * 2 + 4096 * 4096) * 2 + 16 * (2 * 16 * 4096) * 2


def test_qlora_weight_bytes_and_decode_traffic_by_hand():
    """NF4 with double quantization: 4 bits per element, one 8-bit scale code per 64 elements,
    one fp32 nested scale per 256 codes, the two code tables. The decode kernel's row (M = 1)
    moves about that weight, ~3.5x under the bf16 LoRA row's bytes, and fills the GPU."""
    problem = Problem(QLORA, FWD, 1, 4096, 4096, 16, torch.bfloat16, torch.float32)
    codes, scale_codes = 4096 * 4096 // 2, 4096 * 4096 // 64
    assert problem.weight_bytes() == codes + scale_codes + 4 * (scale_codes // 256) + (16 + 256) * 4
    assert problem.min_bytes() == (4096 + 4096) * 2 + problem.weight_bytes() + (16 * 4096 + 4096 * 16) * 4
    (kernels,) = [r for r in build_plan(H100, ops=(QLORA,), modes=(FWD,)) if r.problem == problem and
                  r.path == "triton"]
    decode = [k for k in kernels.kernels if k.kernel == "qlora_decode_kernel"]
    assert len(decode) == 1 and decode[0].ctas == 4096 // 16 and kernels.meets_target
    # the packed weight and scales once, x and s' by each of the 256 programs, B, y
    assert decode[0].bytes == (codes + scale_codes + 4 * (scale_codes // 256) + 256 * 4096 * 2 + 256 * 16 * 4
                               + 4096 * 16 * 4 + 4096 * 2)
    lora = Problem(LORA, FWD, 1, 4096, 4096, 16, torch.bfloat16, torch.float32)
    assert lora.min_bytes() / kernels.bytes > 3.0


def test_fused_forward_traffic_by_hand():
    """M = 4096, K = N = 4096, r = 16 on an H100: 128 x 256 tiles (32 row x 16 column tiles),
    no split-K, the shrink apart (r * N >= 184 * BLOCK_N) in 4 K-splits."""
    problem = Problem(LORA, FWD, 4096, 4096, 4096, 16, torch.bfloat16, torch.float32)
    run = next(r for r in paths.paths(problem, H100) if r.path == "fused")
    with recording(H100) as launches:
        run.run()
    shrink, fwd = (launch for launch in launches if launch.is_triton)
    assert (shrink.name, shrink.grid, fwd.name, fwd.grid) == ("lora_shrink_kernel", (64, 4), "lora_fwd_kernel", (512,))
    cost = kernel_costs.triton_cost(fwd, Hardware(H100.sms, 0))  # no L2: every re-read from DRAM
    x, w, b = 4096 * 4096 * 2, 4096 * 4096 * 2, 4096 * 16 * 4
    parts, y, s = 4 * 4096 * 16 * 4, 4096 * 4096 * 2, 4096 * 16 * 4
    assert cost.bytes == x * 16 + w * 32 + b * 32 + parts * 16 + y + s
    assert cost.flops == 2 * 4096 * 4096 * 4096 + 2 * 4096 * 4096 * 16
    # With L2 reuse: a group of 8 row tiles (8 MB of x) stays in L2, W is read once per group.
    reused = kernel_costs.triton_cost(fwd, Hardware(H100.sms, int(H100.l2_bytes * model.L2_SHARE)))
    assert reused.l2_bytes == x + w * 4 + b + parts + y + s


def test_tma_forward_traffic_is_the_pointer_kernels(monkeypatch):
    """The opt-in TMA forward (FASTPEFT_LORA_TMA=1) on the same problem: one persistent
    program per SM (132 for 512 tiles), and the bytes and FLOPs of the non-fused
    ``lora_fwd_kernel`` above (same tiles, same grouped order: only the loads differ)."""
    problem = Problem(LORA, FWD, 4096, 4096, 4096, 16, torch.bfloat16, torch.float32)
    run = next(r for r in paths.paths(problem, H100) if r.path == "fused")
    costs = {}
    for tma in ("0", "1"):
        monkeypatch.setenv(lora_configs.TMA_ENV, tma)
        with recording(H100) as launches:
            run.run()
        _, fwd = (launch for launch in launches if launch.is_triton)
        costs[fwd.name] = (fwd.grid, *(kernel_costs.triton_cost(fwd, Hardware(H100.sms, l2)) for l2 in (0, 10**8)))
    assert set(costs) == {"lora_fwd_kernel", "lora_fwd_tma_kernel"}
    assert costs["lora_fwd_tma_kernel"][0] == (132,) and costs["lora_fwd_kernel"][0] == (512,)
    assert costs["lora_fwd_tma_kernel"][1:] == costs["lora_fwd_kernel"][1:]


def test_fused_tma_path_is_planned_where_its_kernel_runs(h100_rows, monkeypatch):
    """A fused-tma row (forced by ``tma``: FASTPEFT_BACKEND=triton, FASTPEFT_LORA_TMA=1) for
    every LoRA problem above the medium tiles on sm_90, none elsewhere; its forward GEMM is the
    TMA kernel. A table that picks fused-tma marks that row validated, and the fused row where
    no TMA kernel would run (M = 512, or an A100)."""
    tma_rows = [r for r in h100_rows if r.path == "fused-tma"]
    assert {(r.problem.m, r.problem.n, r.problem.r, r.problem.mode) for r in tma_rows} == {
        (m, n, rank, mode) for m in (4096, 16384) for n in (4096, 14336) for rank in (8, 16, 64)
        for mode in (FWD, FWD_BWD)}
    assert all(r.choice == "tma" for r in tma_rows)
    a100 = Problem(LORA, FWD, 4096, 4096, 4096, 16, torch.bfloat16, torch.float32)
    assert "fused-tma" not in {run.path for run in paths.paths(a100, GPUS["a100"])}
    (run,) = [r for r in paths.paths(a100, H100) if r.path == "fused-tma"]
    with recording(H100) as launches:
        run.run()
    assert "lora_fwd_tma_kernel" in {launch.name for launch in launches if launch.is_triton}

    monkeypatch.setattr(paths, "lora_table_choice", lambda p, gpu: "fused-tma")
    for problem, gpu, validated in ((a100, H100, "fused-tma"), (a100, GPUS["a100"], "fused"),
                                    (Problem(LORA, FWD, 512, 4096, 4096, 16, torch.bfloat16, torch.float32), H100,
                                     "fused")):
        assert [r.path for r in paths.paths(problem, gpu) if paths.VALIDATED in r.choice] == [validated]


def _multi_lora_costs(m: int) -> dict[str, object]:
    """The Triton launches of the multi-LoRA forward at T = m (64 adapters of rank 16 on
    4096 -> 4096, distinct ids) on an H100, by kernel name, with their costs without L2."""
    problem = Problem(MULTI_LORA, FWD, m, 4096, 4096, 16, torch.bfloat16, torch.bfloat16, 64)
    run = next(r for r in paths.paths(problem, H100) if r.path == "triton")
    with recording(H100) as launches:
        run.run()
    return {launch.name: (launch.grid, kernel_costs.triton_cost(launch, Hardware(H100.sms, 0)))
            for launch in launches if launch.is_triton}


def test_multi_lora_decode_traffic_by_hand():
    """T = 1: the shrink's 4 rank blocks x 33 K splits (132 CTAs) read x's row (8 KB) once per
    rank block and A_i (16 x 4096 bf16) once, and write 33 partials of 16 fp32; the expand's
    256 column blocks of 16 each re-read all 33 partials, read B_i once and y's row once
    and write it."""
    costs = _multi_lora_costs(1)
    grid, shrink = costs["multi_lora_decode_shrink_kernel"]
    assert grid == (1, 4, 33)
    x, a, partials = 4096 * 2, 16 * 4096 * 2, 33 * 16 * 4
    assert shrink.bytes == 4 * x + a + partials
    grid, expand = costs["multi_lora_decode_expand_kernel"]
    assert grid == (1, 256)
    assert expand.bytes == 4096 * 16 * 2 + 256 * partials + 2 * 4096 * 2


def test_multi_lora_segment_traffic_by_hand():
    """T = 64, one token per adapter: 68 tiles (64 with one row, 4 past the last segment) x 3 K
    splits (204 CTAs); per tile with work the shrink reads its row of x and A_i and writes 3
    partials of 16 fp32; the expand's 64 column blocks re-read them and read B_i's block."""
    costs = _multi_lora_costs(64)
    grid, shrink = costs["multi_lora_shrink_kernel"]
    assert grid == (68, 1, 3)
    x, a, partials = 4096 * 2, 16 * 4096 * 2, 3 * 16 * 4
    assert shrink.bytes == 64 * (x + a + partials)
    grid, expand = costs["multi_lora_expand_kernel"]
    assert grid == (68, 64)
    assert expand.bytes == 64 * (4096 * 16 * 2 + 64 * partials + 2 * 4096 * 2)


def test_a_kernel_without_a_traffic_model_is_an_error():
    launch = Launch("new_kernel", "fastpeft.kernels.x.launch.f", (1,), {})
    with pytest.raises(KeyError, match="no traffic model for the kernel new_kernel"):
        kernel_costs.triton_cost(launch, Hardware(132, 0))


def test_recording_restores_the_launch_code():
    kernel, info = lora_launch.lora_fwd_kernel, lora_configs.device_info
    with recording(H100):
        assert lora_launch.lora_fwd_kernel is not kernel
        assert lora_configs.device_info(torch.device("cpu")) == (132, 90)
    assert lora_launch.lora_fwd_kernel is kernel and lora_configs.device_info is info


def test_every_planned_kernel_has_a_traffic_model(h100_rows):
    launched = {k.kernel for row in h100_rows for k in row.kernels if k.grid is not None}
    assert launched <= set(kernel_costs.KERNEL_COSTS)
    assert {"lora_fwd_kernel", "lora_hybrid_fwd_kernel", "bottleneck_down_kernel", "bottleneck_up_kernel",
            "multi_lora_decode_shrink_kernel", "multi_lora_shrink_kernel", "qlora_decode_kernel",
            "dequant_4bit_kernel"} <= launched


def test_problems_of_the_issue():
    assert len(problems.problems()) == 2 * 2 * 6 * 3 + 2 * 2 * 5 + 2 * 2 * 7 + 3
    assert all(p.mode == FWD for p in problems.problems(ops=(MULTI_LORA,)))


# --- command line ---------------------------------------------------------------------------


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, err = run_cli(["plan", "--gpu", "h200", "--ops", "multi-lora", "--json", str(path)], capsys)
    assert code == 0, err
    assert "fastpeft plan for h200" in out and "multi_lora_decode_" in out and "6 rows" in out
    data = json.loads(path.read_text())
    assert data["schema"] == "fastpeft-plan/1" and data["gpu"]["name"] == "h200"
    assert len(data["rows"]) == 6 and all(ISSUE_FIELDS <= set(r) for r in data["rows"])
    assert data["model"]["kernels_validated_on_gpu"] is False


def test_cli_misses_shows_only_rows_missing_the_target(capsys):
    code, out, _ = run_cli(["plan", "--ops", "bottleneck", "--modes", "fwd", "--paths", "triton", "--misses"], capsys)
    assert code == 0
    table_lines = [line for line in out.splitlines() if line.startswith("bottleneck")]
    assert table_lines and all(not line.rstrip().endswith(" ok") for line in table_lines)


@pytest.mark.parametrize(("args", "message"), [
    (["--gpu", "v100"], "invalid choice: 'v100'"),
    (["--ops", "lora,conv"], "--ops must be a comma-separated list of lora, qlora, bottleneck, multi-lora"),
    (["--modes", "bwd"], "--modes must be a comma-separated list of fwd, fwd+bwd"),
    (["--launch-us", "-1"], "--launch-us must be >= 0"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_cli_usage_errors(args, message, capsys):
    code, out, err = run_cli(["plan", *args], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: fastpeft plan") and message in err


def test_cli_unreadable_compare_file(tmp_path, capsys):
    code, _, err = run_cli(["plan", "--ops", "multi-lora", "--compare", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "cannot read --compare" in err


# --- measured beside estimated --------------------------------------------------------------


def _ms(value: float) -> dict:
    return {"value": value, "low": value * 0.9, "high": value * 1.1}


FOCUSED = {
    "schema": "fastpeft-focused/2",
    "settings": {"device_name": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16"},
    "timings": [
        {"shape": "q/o", "m": 16, "n": 4096, "k": 4096, "r": 16, "adapter_dtype": "float32", "mode": "fwd",
         "impl": "fused", "status": "ok", "runs": "fused", "ms": _ms(0.02)},
        {"shape": "q/o", "m": 16, "n": 4096, "k": 4096, "r": 16, "adapter_dtype": "float32", "mode": "fwd",
         "impl": "linear", "status": "ok", "runs": "linear", "ms": _ms(0.012)},  # no plan row: ignored
        {"shape": "q/o", "m": 4096, "n": 4096, "k": 4096, "r": 16, "adapter_dtype": "float32", "mode": "fwd+bwd",
         "impl": "hybrid", "status": "ok", "runs": "torch path", "ms": _ms(1.0)},  # ran another path: skipped
        {"shape": "q/o", "m": 512, "n": 4096, "k": 4096, "r": 16, "adapter_dtype": "float32", "mode": "fwd",
         "impl": "torch", "status": "skipped", "runs": "torch", "ms": None},  # not timed: skipped
        {"shape": "down", "m": 16, "n": 4096, "k": 14336, "r": 16, "adapter_dtype": "float32", "mode": "fwd",
         "impl": "fused", "status": "ok", "runs": "fused", "ms": _ms(0.05)},  # a shape the plan lacks
    ],
    "ops": {
        "bottleneck": {"timings": [{"M": 8192, "D": 4096, "R": 64, "mode": "fwd+bwd", "impl": "triton",
                                    "status": "ok", "ms": _ms(0.3)}]},
        "multi-lora": {"timings": [{"T": 64, "hidden": 4096, "r": 16, "L": 64, "ids": "distinct", "mode": "fwd",
                                    "impl": "torch", "status": "ok", "ms": _ms(0.09)}]},
    },
}


def test_compare_puts_measured_times_beside_the_estimates(h100_rows):
    lines = compare_lines(FOCUSED, h100_rows)
    rows = {(r.problem.op, r.problem.mode, r.problem.m, r.problem.r, r.path): r for r in h100_rows
            if r.problem.k == r.problem.n == 4096}
    fused = rows[(LORA, FWD, 16, 16, "fused")]
    assert lines[0] == (f"lora 4096->4096 M=16 r=16 fwd fused (float32 adapters): measured 0.020 ms (0.018-0.022) "
                        f"vs est {fused.est_us:.1f} us (measured / est {20 / fused.est_us:.2f}x; roofline "
                        f"{fused.roofline_us:.1f} us)")
    assert lines[1].startswith("bottleneck D=4096 M=8192 R=64 fwd+bwd triton: measured 0.300 ms")
    assert f"vs est {rows[(BOTTLENECK, FWD_BWD, 8192, 64, 'triton')].est_us:.1f} us" in lines[1]
    assert lines[2].startswith("multi-lora 4096->4096 L=64 T=64 r=16 fwd torch: measured 0.090 ms")
    assert lines[3] == ("(1 measured times have no plan row: a shape, rank, adapter dtype or path the plan does "
                        "not cover)")
    assert len(lines) == 4


def test_cli_compare_takes_the_gpu_from_the_benchmark(tmp_path, capsys):
    path = tmp_path / "focused.json"
    path.write_text(json.dumps(FOCUSED))
    code, out, err = run_cli(["plan", "--ops", "multi-lora", "--compare", str(path)], capsys)
    assert code == 0, err
    assert "fastpeft plan for h100" in out
    assert "measured (fastpeft bench --focused) vs estimated:" in out
    assert "multi-lora 4096->4096 L=64 T=64 r=16 fwd torch: measured 0.090 ms" in out
