"""scripts/gpu_run.sh and its summary (``fastpeft.bench.run_summary``), on CPU.

- the script parses and refuses bad arguments;
- the summary's plumbing verdict: which exit statuses are results, which are problems;
- the outputs of a rehearsal (``scripts/gpu_run.sh --rehearse DIR``, about 3 minutes on two
  cores), the bottleneck-adapter and multi-LoRA steps included (their GPU test files collected,
  their focused cells): .ci/run runs it and points ``FASTPEFT_REHEARSAL_DIR`` at DIR; without that variable
  the test is skipped, so the plain suite does not pay for a second run of the whole script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from fastpeft.bench import focused, run_summary
from fastpeft.bench.export import SCHEMA as BENCH_SCHEMA
from fastpeft.bench.run_summary import Step

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.sh"
# What a run writes: at most 8 files, these names; dispatch.json when the dispatch-table writer
# (fastpeft.kernels.lora.dispatch) exists.
DISPATCH_WRITER = importlib.util.find_spec("fastpeft.kernels.lora.dispatch") is not None
EXPECTED_FILES = {"summary.txt", "env.txt", "tests.log", "focused.json", "bench.log", "bench.json", "bench.md",
                  *(["dispatch.json"] if DISPATCH_WRITER else [])}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("args", [["--rehearse"], ["--rehearse", "a", "b"], ["a", "b"]])
def test_script_refuses_bad_arguments(args, tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
    assert list(tmp_path.iterdir()) == []


def steps(**status: str) -> list[Step]:
    return [Step(name, value, 1, 100) for name, value in status.items()]


def test_failed_tests_and_planned_time_guards_are_results():
    assert run_summary.step_problems(steps(env="0", tests_gpu="1", tests_cpu="124", focused="124", tune="124",
                                           grid="124", dispatch="skipped")) == []


@pytest.mark.parametrize("name,status", [
    ("env", "1"),  # no torch, say
    ("tests_gpu", "124"),  # the GPU tests did not finish: the kernels' correctness is unanswered
    ("tests_gpu", "2"),  # pytest interrupted or a usage error
    ("tests_cpu", "5"),  # nothing collected
    ("focused", "1"),  # the focused benchmark crashed
    ("tune", "1"),  # fastpeft tune crashed, or timed nothing
    ("dispatch", "2"),  # the writer refused its input
])
def test_plumbing_problems(name, status):
    assert run_summary.step_problems(steps(**{name: status})) == [
        f"step {name}: " + ("stopped at its 100 s limit" if status == "124" else f"exit status {status}")
    ]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
skipped="2" tests="6" time="3.5"><testcase classname="tests.test_gpu" name="test_a[x]"><failure message="m"/>
</testcase><testcase classname="tests.test_gpu" name="test_b"><error message="e"/></testcase>
<testcase classname="tests.test_gpu" name="test_c"/></testsuite></testsuites>"""


def test_junit_counts_and_failed_names(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    counts = run_summary.read_junit(path)
    assert (counts.passed, counts.failures, counts.errors, counts.skipped, counts.tests) == (2, 1, 1, 2, 6)
    assert counts.failed == ("tests.test_gpu::test_a[x]", "tests.test_gpu::test_b")


def test_summary_of_a_run_without_results(tmp_path):
    """Nothing written: every missing result is a problem, the test failures are not."""
    junit = tmp_path / "gpu.xml"
    junit.write_text(JUNIT)
    results = tmp_path / "results"
    results.mkdir()
    lines, problems = run_summary.summarize(results, steps(tests_gpu="1", grid="1", dispatch="skipped"),
                                            {"gpu": junit, "cpu": tmp_path / "absent.xml"}, rehearsal=False)
    text = "\n".join(lines)
    assert "gpu: 2 passed, 1 failed, 1 errors, 2 skipped (of 6)" in text
    assert "FAILED tests.test_gpu::test_a[x]" in text
    assert problems == ["tests cpu: no JUnit report", "focused.json was not written", "bench.json was not written"]


def test_summary_reports_a_cut_junit_report(tmp_path):
    junit = tmp_path / "gpu.xml"
    junit.write_text(JUNIT[:100])
    lines, problems = run_summary.summarize(tmp_path, steps(tests_gpu="1"), {"gpu": junit}, rehearsal=False)
    assert "tests gpu: unreadable JUnit report" in problems and any("unreadable report" in line for line in lines)


def test_summary_carries_the_plan_comparison_without_its_step_header(tmp_path):
    log = tmp_path / "plan.txt"
    log.write_text("== plan: python -m fastpeft.plan.cli --compare focused.json (limit 30s)\n"
                   "lora 4096->4096 M=16 r=16 fwd fused (float32 adapters): 0.031 ms vs est 15.7 us\n")
    lines, problems = run_summary.summarize(tmp_path, steps(plan="0"), {}, rehearsal=False, plan=log)
    at = lines.index("plan (fastpeft plan --compare: the model's estimate beside each focused time):")
    assert lines[at + 1] == "  lora 4096->4096 M=16 r=16 fwd fused (float32 adapters): 0.031 ms vs est 15.7 us"
    assert not any("== plan" in line for line in lines)
    skipped, _ = run_summary.summarize(tmp_path, steps(plan="skipped"), {}, rehearsal=False, plan=log)
    assert skipped[skipped.index(lines[at]) + 1] == "  not run"


def test_summary_carries_the_tune_report(tmp_path):
    """The tune step's failures and every entry of its table (the report stays on the GPU
    machine: the summary is how the table comes back); an unreadable report is a problem."""
    entry = {"device": "G", "op": "lora", "mode": "training", "dtype": "bfloat16", "M": 4096, "K": 4096, "N": 14336,
             "r": 16, "implementation": "fused", "max_rel_error": 0.0031, "passed": True, "median_us": 812.5,
             "spread_us": [800.0, 830.0]}
    report = {"table": {"entries": [entry, {**entry, "implementation": "hybrid", "passed": False,
                                            "max_rel_error": None}]},
              "failures": ["hybrid at M=4096 K=4096 N=14336 r=16 dropout=0.05: dx: relative error 2e-1 > 1.6e-2"],
              "peft": [{"mode": "training", "M": 4096, "K": 4096, "N": 14336, "r": 16, "median_us": 1500.0,
                        "spread_us": [1450.0, 1550.0]}],
              "done": 1, "planned": 48, "interrupted": True}
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(report))
    lines, problems = run_summary.summarize(tmp_path, steps(tune="0"), {}, rehearsal=False, tune=path)
    at = next(i for i, line in enumerate(lines) if line.startswith("tune (fastpeft tune"))
    assert lines[at + 1] == "  1 of 48 cases (time budget reached), 2 entries, 1 validation failure(s)"
    assert lines[at + 2].startswith("    FAILED hybrid at M=4096")
    assert lines[at + 4].split() == ["lora", "training", "4096", "4096", "14336", "16", "fused", "yes", "3.10e-03",
                                     "812.5", "(800.0-830.0)"]
    assert lines[at + 5].split()[6:9] == ["hybrid", "NO", "-"]
    assert lines[at + 6].split()[:2] == ["lora", "training"] and lines[at + 6].split()[6:10] == ["peft", "(HF)", "-",
                                                                                                 "-"]
    assert not [p for p in problems if p.startswith("tune")]
    path.write_text("{")
    _, problems = run_summary.summarize(tmp_path, steps(tune="0"), {}, rehearsal=False, tune=path)
    assert any(p.startswith("tune: tune.json is unreadable") for p in problems)
    lines, _ = run_summary.summarize(tmp_path, steps(tune="skipped"), {}, rehearsal=False, tune=path)
    assert lines[lines.index(lines[at]) + 1] == "  not run"


def test_summary_flags_too_many_files_and_a_gpu_run_that_saw_no_gpu(tmp_path):
    junit = tmp_path / "gpu.xml"
    junit.write_text(JUNIT.replace('errors="1" failures="1"\nskipped="2"', 'errors="0" failures="0"\nskipped="6"'))
    results = tmp_path / "results"
    results.mkdir()
    for i in range(9):
        (results / f"f{i}").write_text("")
    _, problems = run_summary.summarize(results, steps(focused="skipped", grid="skipped", dispatch="skipped"),
                                        {"gpu": junit}, rehearsal=False)
    assert "tests gpu: every test skipped (no CUDA device seen)" in problems
    assert any(p.startswith("results: 10 entries") for p in problems)  # 9 files and summary.txt


@pytest.fixture(scope="module")
def rehearsal() -> Path:
    """The results folder of a rehearsal run before the tests (.ci/run does that)."""
    directory = os.environ.get("FASTPEFT_REHEARSAL_DIR")
    if not directory:
        pytest.skip("set FASTPEFT_REHEARSAL_DIR to the folder of a scripts/gpu_run.sh --rehearse run (.ci/run does)")
    return Path(directory)


def test_rehearsal_wrote_the_expected_files_and_no_plumbing_problem(rehearsal):
    files = {p.name for p in rehearsal.iterdir()}
    assert files == EXPECTED_FILES and len(files) <= run_summary.MAX_RESULT_FILES
    assert all((rehearsal / name).is_file() for name in files)
    summary = (rehearsal / "summary.txt").read_text()
    assert "plumbing problems: none" in summary
    assert re.search(r"^  plan +0 ", summary, re.M)  # the plan step ran and exited 0
    gpu = re.search(r"gpu: 0 passed, 0 failed, 0 errors, (\d+) skipped \(of (\d+)\)", summary)
    assert gpu and gpu[1] == gpu[2] and int(gpu[1]) > 0  # the GPU tests collected, and every one skipped


def test_rehearsal_focused_json_schema(rehearsal):
    data = json.loads((rehearsal / "focused.json").read_text())
    assert data["schema"] == focused.SCHEMA
    assert set(data) == {"schema", "complete", "interrupted", "elapsed_s", "settings", "timings", "fastest", "profile",
                         "ops"}
    assert data["settings"]["dtype"] == "bfloat16" and data["settings"]["adapter_dtypes"] == ["float32", "bfloat16"]
    # The rehearsal runs on CPU, where default_config leaves out the sm_90-only TMA row.
    assert set(data["settings"]["rows"]) == {row.name for row in focused.ROWS} - {focused.FUSED_TMA}
    assert {t["status"] for t in data["timings"]} <= {focused.OK, focused.SKIPPED, focused.UNAVAILABLE}
    assert any(t["status"] == focused.OK for t in data["timings"])
    assert set(data["profile"]["impls"]) == set(data["settings"]["rows"])
    assert all(entry["error"] is None or row == focused.HYBRID for row, entry in data["profile"]["impls"].items())


def test_rehearsal_focused_ran_the_other_ops_cells(rehearsal):
    """The focused run's other ops: every planned row of each is measured or skipped with a
    reason (the kernel rows: no CUDA device; the rows that cannot run on a CPU among them),
    fastpeft's torch path measured, in the summary."""
    data = json.loads((rehearsal / "focused.json").read_text())
    assert set(data["ops"]) == {focus.name for focus in focused.TINY_OP_FOCUS}
    for focus in focused.TINY_OP_FOCUS:
        op = data["ops"][focus.name]
        assert {t["impl"] for t in op["timings"]} == set(focus.rows)
        assert {t["status"] for t in op["timings"]} <= {"ok", "skipped"}
        assert any(t["impl"] == "torch" and t["status"] == "ok" for t in op["timings"])
        assert all(t["error"] for t in op["timings"] if t["status"] == "skipped")
        gpu_only = {row.name for row in focus.spec.rows if row.unavailable(torch.device("cpu"))}
        assert gpu_only <= {t["impl"] for t in op["timings"] if t["status"] == "skipped"}
        assert all("CUDA device" in t["error"] for t in op["timings"] if t["status"] == "skipped")
    summary = (rehearsal / "summary.txt").read_text()
    assert "other ops (cells per status" in summary
    assert all(f"    {focus.name}: " in summary for focus in focused.TINY_OP_FOCUS)


def test_rehearsal_gpu_group_collected_the_new_gpu_tests(rehearsal):
    """The GPU step's command line names the CUDA C++ test files, every file with the gpu marker
    and the kernel, op, layer and serving test files that use the GPU (the LoRA kernels' dropout,
    hybrid, launch planning and dispatch, the QLoRA op and kernels included), and its skip list
    shows they were collected."""
    log = (rehearsal / "tests.log").read_text()
    command = next(line for line in log.splitlines() if line.startswith("== tests_gpu: "))
    def files(pattern: str, regex: str) -> list[str]:
        return [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "tests").glob(pattern))
                if re.search(regex, p.read_text())]

    on_gpu = r"\bDEVICE\b|cuda"  # the files that put tensors on the GPU
    device_tests = ("kernels/test_dropout_mask.py", "kernels/lora/test_hybrid.py", "kernels/lora/test_launch_planning.py",
                    "kernels/lora/test_dispatch.py", "ops/test_bottleneck_*.py", "ops/test_multi_lora_*.py",
                    "methods/bottleneck/test_*.py", "methods/lora/test_multi_layer.py",
                    "serving/test_multi_adapter_model.py", "kernels/quant/test_*.py", "ops/test_qlora_linear.py")
    expected = ["tests/test_gpu.py", "tests/test_cuda_gpu.py", "tests/ops/test_bottleneck_adapter.py",
                "tests/ops/test_multi_lora_linear.py", "tests/kernels/test_dropout_mask.py",
                "tests/kernels/lora/test_hybrid.py", *files("**/test_*.py", r"pytest\.mark\.gpu\b"), *(f for g in device_tests for f in files(g, on_gpu))]
    assert all(f" {name}" in command for name in expected), command
    assert "SKIPPED" in log and "tests/test_cuda_gpu.py" in log.split("== tests_gpu: ", 1)[1]


def test_rehearsal_bench_and_dispatch_json(rehearsal):
    bench = json.loads((rehearsal / "bench.json").read_text())
    assert bench["schema"] == BENCH_SCHEMA and ("timings" in bench or "e2e" in bench)
    if not DISPATCH_WRITER:
        return
    table = json.loads((rehearsal / "dispatch.json").read_text())
    assert table["schema"].startswith("fastpeft-lora-dispatch/")
    assert any(isinstance(entry["measured"], dict) for entry in table["entries"])


def test_rehearsal_tune_validated_and_timed_every_case(rehearsal):
    """The rehearsal's tune step (fastpeft tune --rehearse) ran every case with no validation
    failure, and its entries came back in summary.txt."""
    summary = (rehearsal / "summary.txt").read_text()
    assert re.search(r"^  tune +0 ", summary, re.M)
    assert "  10 of 10 cases, 24 entries, 0 validation failure(s)" in summary
    rows = [line.split() for line in summary.splitlines()
            if re.match(r"  (lora|bottleneck|multi_lora) +(training|training_dropout|inference) ", line)]
    ours = [row for row in rows if row[6] != "peft"]
    assert len(ours) == 24 and all(row[7] == "yes" for row in ours)
    assert {(row[0], row[6]) for row in ours} == {("lora", "torch"), ("lora", "fused"), ("lora", "hybrid"),
                                                  ("bottleneck", "torch"), ("bottleneck", "triton"),
                                                  ("multi_lora", "torch"), ("multi_lora", "triton")}
    assert len(rows) - len(ours) == (4 if importlib.util.find_spec("peft") else 0)  # PEFT's layer, the reference
