"""Fast CPU tests of the prompt-learning part of ``fastpeft bench --e2e``: the prompt / prefix
twins start identical and take PEFT's training step, and a tiny run reports training step,
memory and generate rows with their ratios (no test asserts on a time)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from fastpeft.bench import e2e
from fastpeft.bench.e2e import (
    BASE_MODEL,
    DECODE_TOKENS_PER_S,
    FASTPEFT,
    PEFT,
    PREFIX_TUNING,
    PROMPT_HEADERS,
    PROMPT_METHODS,
    PROMPT_TUNING,
    SAVED_BYTES,
    TOKENS_PER_S,
    E2EConfig,
    LlamaShape,
    build_prompt_twins,
    e2e_json,
    e2e_markdown,
    make_train_step,
    prompt_table_rows,
    random_tokens,
    run_e2e,
)
from fastpeft.bench.timing import TimingBudget
from fastpeft.methods.prompt.model import prompt_encoder
from tests.helpers.numerics import assert_close

pytest.importorskip("transformers")
pytest.importorskip("peft")

ONE_STEP = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)
# 2 layers of width 64, 2 x 8 tokens, one timed step: a step takes milliseconds.
TINY = E2EConfig(LlamaShape(64, 128, 2, 4, 2, 128), 2, 8, torch.device("cpu"), torch.float32, ONE_STEP,
                 prompt_methods=PROMPT_METHODS)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_twins_take_peft_step(method):
    twins = build_prompt_twins(TINY, method)
    ids = random_tokens(TINY)
    frozen = {name: p.detach().clone() for name, p in twins[FASTPEFT].named_parameters() if not p.requires_grad}
    for model in twins.values():
        make_train_step(model, ids)()
    theirs = dict(twins[PEFT].prompt_encoder["default"].named_parameters())
    for name, p in prompt_encoder(twins[FASTPEFT]).named_parameters():
        assert p.grad.abs().sum() > 0, name
        assert_close(p.grad, theirs[name].grad, torch.float32, f"{method} grad {name}")
        assert_close(p, theirs[name], torch.float32, f"{method} {name} after the step")
    for name, p in twins[FASTPEFT].named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def _no_lora(config, quantization=None):
    raise RuntimeError("LoRA twins not built in this test")


def _one_call_ms(fn, device, budget):
    """One timed call (the plumbing needs a time, not a good one)."""
    start = time.perf_counter()
    fn()
    return [(time.perf_counter() - start) * 1e3]


@pytest.fixture(scope="module")
def prompt_run():
    """A tiny run of the prompt-learning models only (the LoRA case has its own tests)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(e2e, "DECODE_TOKENS", 3)
        patch.setattr(e2e, "DECODE_BUDGET", ONE_STEP)
        patch.setattr(e2e, "build_twins", _no_lora)
        patch.setattr(e2e, "timed_calls_ms", _one_call_ms)
        return run_e2e(TINY, log=lambda message: None)


def test_prompt_run_reports_training_and_generate(prompt_run):
    results = prompt_run.prompt_results
    assert [(r.method, r.impl) for r in results] == [
        (PROMPT_TUNING, PEFT), (PROMPT_TUNING, FASTPEFT), (PREFIX_TUNING, PEFT), (PREFIX_TUNING, FASTPEFT),
        ("-", BASE_MODEL)]
    assert all(r.error is None for r in results)
    assert prompt_run.errors == [f"e2e {impl}: building the models: RuntimeError: LoRA twins not built in this test"
                                 for impl in (PEFT, FASTPEFT)]
    for r in results[:4]:
        assert 0 < r.train.ms.value and r.train.saved_bytes > 0 and r.train.peak_bytes is None
        assert (r.decode_tokens_per_s is not None) == (r.impl == FASTPEFT)
    assert results[-1].train is None and results[-1].decode_tokens_per_s.value > 0
    for method in PROMPT_METHODS:
        saved = prompt_run.prompt_ratio(method, SAVED_BYTES)
        assert saved.low == saved.value == saved.high and 0.5 < saved.value <= 1.0  # exact; never more than PEFT
        assert prompt_run.prompt_ratio(method, TOKENS_PER_S).value > 0
        assert prompt_run.prompt_ratio(method, DECODE_TOKENS_PER_S).value > 0

    rows = prompt_table_rows(prompt_run)
    assert all(len(row) == len(PROMPT_HEADERS) for row in rows)
    assert rows[1][4] != "-" and rows[1][-1] != "-" and rows[0][4] == rows[0][-1] == "-"
    data = json.loads(json.dumps(e2e_json(prompt_run)))
    assert [r["impl"] for r in data["prompt_learning"]] == [r.impl for r in results]
    assert set(data["prompt_learning_ratios"]) == set(PROMPT_METHODS)
    assert "### Prompt tuning and prefix tuning" in e2e_markdown(prompt_run)


def test_a_failing_prompt_build_is_reported(monkeypatch):
    def broken(config, method):
        raise RuntimeError("no memory")

    monkeypatch.setattr(e2e, "build_prompt_twins", broken)
    monkeypatch.setattr(e2e, "measure_base_decode", lambda config: e2e.PromptResult("-", BASE_MODEL, None))
    monkeypatch.setattr(e2e, "build_twins", _no_lora)
    run = run_e2e(dataclasses.replace(TINY), log=lambda message: None)
    assert run.failed
    assert [e for e in run.errors if "prompt tuning" in e] == [
        f"e2e prompt tuning {impl}: building the models: RuntimeError: no memory" for impl in (PEFT, FASTPEFT)]
    assert [row[2] for row in prompt_table_rows(run)[:4]] == ["error"] * 4
