"""``fastpeft tune`` end to end: the rehearsal (the whole pipeline on the CPU, kernels in the
interpreter) writes a valid table with every implementation validated and timed, which ``auto``
then follows on a (mocked) CUDA device only where validation passed; the time budget; the
shapes a model config gives; the atomic table file under a concurrent reader; usage errors."""

from __future__ import annotations

import importlib
import importlib.util
import json
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastpeft import backend
from fastpeft.bench.cases import LLAMA3_8B_SHAPES, LayerShape
from fastpeft.kernels import tuned_table
from fastpeft.kernels.lora import dispatch
from fastpeft.tune import cli as tune_cli
from fastpeft.tune.shapes import load_model_config, shapes_from_config
from fastpeft.tune.table_file import write_table
from tests.helpers.cli_runner import run_cli
from tests.helpers.devices import KERNELS_RUN

needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="needs the Triton kernels (a GPU or the interpreter)")

LLAMA3_8B_CONFIG = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "model_type": "llama"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[dict, dict]:
    """One ``fastpeft tune --rehearse`` run: (the table it wrote, its JSON report)."""
    out = tmp_path_factory.mktemp("tune")
    code = tune_cli.main(["--rehearse", "--out", str(out), "--json", str(out / "report.json")])
    assert code == 0
    (path,) = out.glob("tuned-*.json")
    return json.loads(path.read_text()), json.loads((out / "report.json").read_text())


@needs_kernels
def test_the_rehearsal_writes_a_valid_table_of_validated_timed_implementations(rehearsal):
    table, report = rehearsal
    assert tuned_table.validate_table(table) == report["table"]
    assert table["device"]["gpu"] == tune_cli.REHEARSAL_GPU
    assert report["failures"] == [] and report["done"] == report["planned"] == 10 and not report["interrupted"]
    cases = {(e["op"], e["mode"], e["M"], e["K"], e["N"], e["r"]) for e in table["entries"]}
    lora_cases = {("lora", "training", 33, 64, 80, 8), ("lora", "training_dropout", 33, 64, 80, 8),
                  ("lora", "inference", 1, 64, 80, 8), ("lora", "inference", 33, 64, 80, 8)}
    assert cases == lora_cases | {("bottleneck", mode, m, 64, 64, 8) for mode, m in (
        ("training", 33), ("training_dropout", 33), ("inference", 1), ("inference", 33))} | {
        ("multi_lora", "inference", 1, 64, 80, 8), ("multi_lora", "inference", 33, 64, 80, 8)}
    if importlib.util.find_spec("peft") is not None:  # PEFT's layer timed in the same rounds, as the reference
        assert {("lora", p["mode"], p["M"], p["K"], p["N"], p["r"]) for p in report["peft"]} == lora_cases
    implementations = {"lora": ["fused", "hybrid", "torch"], "bottleneck": ["torch", "triton"],
                       "multi_lora": ["torch", "triton"]}
    for case in cases:
        here = [e for e in table["entries"] if (e["op"], e["mode"], e["M"], e["K"], e["N"], e["r"]) == case]
        assert sorted(e["implementation"] for e in here) == implementations[case[0]]
        assert all(e["passed"] and 0 < e["max_rel_error"] < 0.05 and e["dtype"] == "bfloat16" for e in here)


@needs_kernels
# multi-LoRA's alignment check reads the (fake) tensors' data pointers
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
def test_auto_follows_the_tuned_table_where_validation_passed(rehearsal, monkeypatch, tmp_path):
    """The rehearsal's table, as if made on this (mocked) GPU with each op's kernel (LoRA's
    fused, the bottleneck adapter's and multi-LoRA's Triton) fastest everywhere but failed at
    decode: auto takes the kernel for the training step and the torch path at decode, for every
    op; multi-LoRA's backward is not tuned."""
    # the op modules (fastpeft.ops re-exports the functions under the same names)
    bottleneck_op = importlib.import_module("fastpeft.ops.bottleneck_adapter")
    multi_lora_op = importlib.import_module("fastpeft.ops.multi_lora_linear")

    table, _ = rehearsal
    device = {**table["device"], "gpu": "NVIDIA H100 80GB HBM3", "capability": "sm_90"}
    mocked = {**table, "device": device, "entries": []}
    for e in table["entries"]:
        e = {**e, "device": device["gpu"]}
        if e["implementation"] in ("fused", "triton"):
            e.update(median_us=1.0, spread_us=[0.9, 1.1], passed=e["M"] != 1)
        mocked["entries"].append(e)
    monkeypatch.setenv(tuned_table.ENV_DIR, str(tmp_path))
    write_table(mocked, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tuned_table, "_fingerprint_json", lambda index: json.dumps(device, sort_keys=True))
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    monkeypatch.setattr(backend, "KERNELS_VALIDATED_ON_GPU", False)
    tuned_table._load.cache_clear()

    def cuda(*size: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device="cuda")

    def choice(m: int, training: bool, dropout: bool = False) -> str:
        with FakeTensorMode():
            return dispatch.choose_implementation(cuda(m, 64), cuda(80, 64), cuda(8, 64, dtype=torch.float32),
                                                  training, dropout)

    def bottleneck_choice(m: int, training: bool, dropout: bool = False) -> str:
        with FakeTensorMode():
            return bottleneck_op.implementation(cuda(m, 64), cuda(8, 64, dtype=torch.float32), "auto", None,
                                                training, dropout)

    def multi_lora_choice(m: int, pass_: str = "forward") -> str:
        with FakeTensorMode():
            return multi_lora_op.implementation(cuda(m, 64), cuda(80, 64), cuda(8, 8, 64, dtype=torch.float32),
                                                cuda(8, 80, 8, dtype=torch.float32), pass_)

    assert choice(33, True) == "fused"
    assert choice(33, True, dropout=True) == "fused"
    assert choice(2048, True) == "fused"  # the nearest measured shape
    assert choice(1, False) != "fused"  # failed validation there
    assert choice(33, False) == "fused"
    assert [bottleneck_choice(33, True), bottleneck_choice(33, True, True), bottleneck_choice(33, False)] == [
        "triton"] * 3
    assert bottleneck_choice(1, False) == "torch"
    assert multi_lora_choice(33) == "triton" and multi_lora_choice(1) == "torch"
    assert multi_lora_choice(33, "backward") == "torch"  # not tuned: the kernels are not validated by the project
    tuned_table._load.cache_clear()


@needs_kernels
def test_the_time_budget_stops_between_cases(tmp_path, capsys):
    code, out, err = run_cli(["tune", "--rehearse", "--out", str(tmp_path), "--time-budget", "1e-9"], capsys)
    assert code == 1 and "time budget of 0 s reached: 0 of 10 cases done" in err and "no table written" in err
    assert not list(tmp_path.glob("tuned-*.json"))


@pytest.mark.parametrize("args,message", [
    (["--ops", "dora"], "unknown op"),
    (["--rehearse"], "--rehearse needs --out"),
    (["--time-budget", "0"], "positive number of seconds"),
    ([], "no CUDA device"),
])
def test_usage_errors(args, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(["tune", *args], capsys)
    assert code == 2 and message in err


def test_shapes_of_a_model_config(tmp_path):
    assert shapes_from_config(LLAMA3_8B_CONFIG) == LLAMA3_8B_SHAPES
    mha = shapes_from_config({"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12})
    assert mha == (LayerShape("q/o", 768, 768), LayerShape("gate/up", 768, 3072), LayerShape("down", 3072, 768))
    with pytest.raises(ValueError, match="'intermediate_size' must be a positive integer"):
        shapes_from_config({"hidden_size": 768, "num_attention_heads": 12})
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    assert load_model_config(str(tmp_path)) == LLAMA3_8B_CONFIG
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="JSON object"):
        load_model_config(str(tmp_path / "list.json"))


def test_a_reader_never_sees_a_partial_table(tmp_path):
    """The table file is replaced whole: a reader racing 40 rewrites (alternating two tables
    of different sizes) always parses one of them."""
    device = {"gpu": "G", "sms": 1, "capability": "sm_90", "driver": "1", "torch": "t", "triton": "3",
              "fastpeft": "0"}
    entry = {"device": "G", "op": "lora", "mode": "training", "dtype": "bfloat16", "M": 1, "K": 16, "N": 16, "r": 8,
             "implementation": "torch", "max_rel_error": 0.001, "passed": True, "median_us": 2.0,
             "spread_us": [1.0, 3.0]}
    tables = [{"schema": tuned_table.SCHEMA, "device": device, "entries": [entry] * count} for count in (1, 400)]
    path = tuned_table.table_path(device, tmp_path)
    write_table(tables[0], tmp_path)
    seen, done = [], threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(len(json.loads(path.read_text())["entries"]))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(40):
        write_table(tables[i % 2], tmp_path)
    done.set()
    reader.join()
    assert seen and set(seen) <= {1, 400}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


_WRITER = """
import sys
from pathlib import Path
from fastpeft.kernels import tuned_table
from fastpeft.tune.table_file import write_table
device = {"gpu": "G", "sms": 1, "capability": "sm_90", "driver": "1", "torch": "t", "triton": "3", "fastpeft": "0"}
entry = {"device": "G", "op": "lora", "mode": "training", "dtype": "bfloat16", "M": 1, "K": 16, "N": 16, "r": 8,
         "implementation": "torch", "max_rel_error": 0.001, "passed": True, "median_us": 2.0, "spread_us": [1.0, 3.0]}
i = 0
while True:
    i += 1
    write_table({"schema": tuned_table.SCHEMA, "device": device, "entries": [entry] * (1 + i % 2 * 5000)},
                Path(sys.argv[1]))
"""


def test_a_writer_killed_at_random_moments_leaves_a_whole_table(tmp_path):
    """kill -9 of a process rewriting the table, at 6 random moments: the file always parses
    as one of the two tables, and the next write removes the killed writer's temp file."""
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tuned_table.table_path({"gpu": "G", "capability": "sm_90"}, tmp_path)
    rng = random.Random(7)
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        table = tuned_table.validate_table(json.loads(path.read_text()))
        assert len(table["entries"]) in (1, 5001)
    write_table(table, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@needs_kernels
def test_an_implementation_failing_one_case_is_never_chosen(tmp_path, monkeypatch):
    """LoRA's fused fails validation at one timed case (decode) only: every fused entry of the
    table has passed false, so auto never picks it; the other ops' are untouched."""
    import dataclasses

    from fastpeft.tune import ops
    from fastpeft.tune.checks import Validation

    lora = ops.TUNERS["lora"]

    def fused_wrong_at_decode(implementation, problem, *args, **kwargs):
        if implementation == "fused" and problem.m == 1:
            return Validation(0.5, False, ("y: 1 element(s) beyond their magnitude bound",))
        return lora.validate(implementation, problem, *args, **kwargs)

    monkeypatch.setitem(ops.TUNERS, "lora", dataclasses.replace(lora, validate=fused_wrong_at_decode))
    assert tune_cli.main(["--rehearse", "--ops", "lora,bottleneck", "--out", str(tmp_path), "--json",
                          str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failures"] == ["fused at lora M=1 K=64 N=80 r=8 dropout=0.0: y: 1 element(s) beyond their "
                                  "magnitude bound"]
    entries = report["table"]["entries"]
    assert {e["op"] for e in entries} == {"lora", "bottleneck"}
    assert {e["passed"] for e in entries if e["implementation"] == "fused"} == {False}
    assert all(e["passed"] for e in entries if e["implementation"] != "fused")
