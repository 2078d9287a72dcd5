"""Fast CPU tests of the end-to-end case of ``fastpeft bench`` (``fastpeft.bench.e2e``): the twin
models start identical with the base frozen, a step trains only the LoRA parameters, fastpeft
and PEFT take the same step without dropout, and the report / JSON / CLI carry the results.
A tiny Llama (2 layers of width 64) and one timed step per model; no test asserts on a time."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fastpeft.bench import e2e
from fastpeft.bench.__main__ import main
from fastpeft.bench.e2e import (
    E2E_HEADERS, FASTPEFT, PEAK_BYTES, PEFT, SAVED_BYTES, TOKENS_PER_S, E2EConfig, E2EResult, E2ERun, LlamaShape,
    build_twins, canonical_parameters, check_twins, e2e_footer_lines, e2e_markdown, e2e_table_rows, make_train_step,
    random_tokens, run_e2e,
)
from fastpeft.bench.export import SCHEMA, to_json_dict
from fastpeft.bench.spread import INCONCLUSIVE, MET, MISSED, Spread
from fastpeft.bench.timing import TimingBudget
from tests.helpers.numerics import TOLERANCE, assert_close, relative_error

pytest.importorskip("transformers")
pytest.importorskip("peft")

CPU = torch.device("cpu")
# Three timed steps after the untimed and estimating ones, the fewest with quartiles: the tests
# check plumbing, not speed.
THREE_STEPS = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)
# 2 layers of width 64 (4 query / 2 KV heads), 2 x 16 tokens: a step takes milliseconds.
TINY = E2EConfig(LlamaShape(64, 128, 2, 4, 2, 128), 2, 16, CPU, torch.float32, THREE_STEPS)


def tiny_twins(dropout: float) -> dict[str, torch.nn.Module]:
    """The twin models at ``dropout``, with the same random nonzero ``lora_B`` in both, so that
    the LoRA branch changes the outputs and ``lora_A`` gets gradients (PEFT's init has B = 0)."""
    twins = build_twins(dataclasses.replace(TINY, dropout=dropout))
    generator = torch.Generator().manual_seed(1)
    ours, theirs = (canonical_parameters(twins[name]) for name in (FASTPEFT, PEFT))
    with torch.no_grad():
        for name, p in ours.items():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
                theirs[name].copy_(p)
    return twins


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits (dropout off), the model left in training mode."""
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=input_ids).logits
    finally:
        model.train()


def test_twins_start_identical():
    twins = tiny_twins(dropout=0.05)
    check_twins(twins[FASTPEFT], twins[PEFT])  # same names, values, frozen base
    ids = random_tokens(TINY)
    assert_close(logits(twins[FASTPEFT], ids), logits(twins[PEFT], ids), torch.float32, "logits")
    trainable = [n for n, p in canonical_parameters(twins[FASTPEFT]).items() if p.requires_grad]
    assert len(trainable) == 2 * 7 * TINY.model.num_hidden_layers  # A and B of 7 linears per layer


def test_check_twins_catches_different_weights_and_a_trainable_base():
    twins = tiny_twins(dropout=0.0)
    ours = canonical_parameters(twins[FASTPEFT])
    weight = ours["model.layers.0.mlp.up_proj.weight"]
    weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="only LoRA parameters must"):
        check_twins(twins[FASTPEFT], twins[PEFT])
    weight.requires_grad_(False)
    with torch.no_grad():
        weight[0, 0] += 1.0
    with pytest.raises(RuntimeError, match="different values"):
        check_twins(twins[FASTPEFT], twins[PEFT])


@pytest.mark.parametrize("impl", [FASTPEFT, PEFT])
def test_one_step_changes_only_lora_parameters(impl):
    model = tiny_twins(dropout=0.05)[impl]
    before = {name: p.detach().clone() for name, p in canonical_parameters(model).items()}
    make_train_step(model, random_tokens(TINY))()
    for name, p in canonical_parameters(model).items():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert torch.equal(p, before[name]) != is_lora, f"{impl} {name}: changed {not torch.equal(p, before[name])}"


def test_one_step_without_dropout_matches_peft():
    """Same weights, batch and step: the gradients and the updated LoRA weights agree to fp32
    rounding (fastpeft folds the scaling into the rank-r side and sums in another order)."""
    twins = tiny_twins(dropout=0.0)
    ids = random_tokens(TINY)
    for model in twins.values():
        make_train_step(model, ids)()
    ours, theirs = (canonical_parameters(twins[name]) for name in (FASTPEFT, PEFT))
    lora = [name for name, p in ours.items() if p.requires_grad]
    for name in lora:
        assert ours[name].grad.abs().sum() > 0, f"{name}: zero gradient, the comparison proves nothing"
        err = relative_error(ours[name].grad, theirs[name].grad)
        assert err <= TOLERANCE[torch.float32], f"{name}: gradient relative error {err:.2e}"
        assert_close(ours[name], theirs[name], torch.float32, f"{name} after the step")


@pytest.fixture(scope="module")
def tiny_run() -> E2ERun:
    return run_e2e(TINY, log=lambda message: None)


def test_run_measures_both_models(tiny_run):
    assert not tiny_run.failed
    assert [r.impl for r in tiny_run.results] == [PEFT, FASTPEFT]
    for r in tiny_run.results:
        assert 0 < r.ms.low <= r.ms.value <= r.ms.high
        assert r.tokens_per_s.value == pytest.approx(TINY.tokens / (r.ms.value * 1e-3))
        assert r.tokens_per_s.low == pytest.approx(TINY.tokens / (r.ms.high * 1e-3))  # the slow steps
        assert r.peak_bytes is None  # CPU: no peak statistics
    # with dropout PEFT saves a dropped-out copy of each layer's input, fastpeft regenerates the mask
    saved = tiny_run.ratio(SAVED_BYTES)
    assert saved.value < 1.0 and saved.low == saved.high == saved.value  # bytes are exact
    assert tiny_run.settings["model"]["parameters"] > tiny_run.settings["model"]["trainable_parameters"] > 0
    assert tiny_run.settings["lora"]["layers"] == 7 * TINY.model.num_hidden_layers


def test_json_and_report_have_the_e2e_fields(tiny_run):
    data = json.loads(json.dumps(to_json_dict(None, tiny_run)))
    assert data["schema"] == SCHEMA and "timings" not in data  # no layer grid in this run
    section = data["e2e"]
    for key in ("date", "device_name", "torch", "transformers", "peft", "dtype", "batch", "seq_len", "lora", "memory"):
        assert key in section["settings"]
    assert [set(r) for r in section["results"]] == [{f.name for f in dataclasses.fields(E2EResult)}] * 2
    for r in section["results"]:
        assert r["ms"]["low"] <= r["ms"]["value"] <= r["ms"]["high"]
        assert set(r["tokens_per_s"]) == {"value", "low", "high"}
    ratios = section["fastpeft_vs_peft"]
    assert set(ratios) == {TOKENS_PER_S, PEAK_BYTES, SAVED_BYTES} and ratios[PEAK_BYTES] is None
    assert ratios[TOKENS_PER_S]["low"] <= ratios[TOKENS_PER_S]["value"] <= ratios[TOKENS_PER_S]["high"]
    assert ratios[SAVED_BYTES]["low"] == ratios[SAVED_BYTES]["value"] == ratios[SAVED_BYTES]["high"]
    assert [t["metric"] for t in section["targets"]] == [TOKENS_PER_S, SAVED_BYTES]  # CPU: saved bytes as proxy
    assert all(t["verdict"] in (MET, MISSED, INCONCLUSIVE) for t in section["targets"])
    rows = e2e_table_rows(tiny_run)
    assert [row[0] for row in rows] == [PEFT, FASTPEFT] and all(len(row) == len(E2E_HEADERS) for row in rows)
    assert e2e_markdown(tiny_run).startswith("## End-to-end training step")


def synthetic_result(impl: str, ms: tuple[float, float, float], peak: int, saved: int) -> E2EResult:
    """A measured E2EResult: step time (median, q1, q3) of 1000-token steps, peak and saved bytes."""
    step = Spread(*ms)
    return E2EResult(impl, step, step.rate(1000 * 1e3), peak, saved)


GPU_SETTINGS = {"device": "cuda", "lora": {"lora_dropout": 0.05}}


def test_targets_use_peak_memory_on_a_gpu_and_apply_at_their_dropout():
    results = [synthetic_result(PEFT, (100.0, 99.0, 101.0), 1000, 500),
               synthetic_result(FASTPEFT, (70.0, 69.0, 71.0), 700, 200)]
    checks = E2ERun(GPU_SETTINGS, results).target_checks()
    expected = [(TOKENS_PER_S, 1.428571, MET), (PEAK_BYTES, 0.7, MET)]  # tokens/s: 1.39x-1.46x
    assert [(c.metric, round(c.value.value, 6), c.verdict) for c in checks] == expected
    assert E2ERun({**GPU_SETTINGS, "lora": {"lora_dropout": 0.1}}, results).target_checks() == []


def test_a_noisy_tokens_per_s_ratio_is_inconclusive_and_memory_is_exact():
    """fastpeft's median step is 1.43x faster, but the ranges allow 1.18x-1.72x: no verdict on
    >= 1.3x. Memory ratios are exact points."""
    results = [synthetic_result(PEFT, (100.0, 90.0, 110.0), 1000, 500),
               synthetic_result(FASTPEFT, (70.0, 64.0, 76.0), 900, 200)]
    run = E2ERun(GPU_SETTINGS, results)
    tokens, memory = run.target_checks()
    assert tokens.verdict == INCONCLUSIVE and tokens.value.low == pytest.approx(90 / 76)
    assert memory.verdict == MISSED and memory.value == Spread.point(0.9)
    fastpeft_row = e2e_table_rows(run)[1]
    assert fastpeft_row[1] == "70.0 (64.0-76.0)" and fastpeft_row[2] == "14,286 (13,158-15,625)"
    assert fastpeft_row[3] == "1.43x (1.18-1.72) ?" and fastpeft_row[5] == "0.90x ✗"
    footer = e2e_footer_lines(run)
    assert footer[1] == "  >= 1.3x PEFT's tokens/s (dropout 0.05): 1.43x (1.18-1.72) inconclusive"
    assert footer[2] == "  <= 0.8x PEFT's peak memory (dropout 0.05): 0.90x missed"


def test_a_failing_build_is_reported(monkeypatch):
    def broken(config, quantization=None):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(e2e, "build_twins", broken)
    run = run_e2e(TINY, log=lambda message: None)
    assert run.failed and len(run.errors) == 2
    assert run.errors[0].endswith("building the models: RuntimeError: out of memory")
    assert [row[1] for row in e2e_table_rows(run)] == ["error", "error"]


def test_qlora_twins_start_identical_and_take_the_same_step():
    """On the quantized base (the decoder's linears in NF4 with double quantization, PEFT's
    ``lora.bnb`` layers against fastpeft's ``QuantLoRALinear``) the twins start identical and
    their training-mode logits (bitsandbytes' exact CPU forward) agree; the run reports both
    steps with their ratios and the QLoRA targets."""
    pytest.importorskip("bitsandbytes")
    from fastpeft.bench.qlora import NF4_DQ
    from fastpeft.methods.lora.layer import QuantLoRALinear

    config = dataclasses.replace(TINY, dropout=0.0, quantizations=(NF4_DQ,))
    twins = build_twins(config, NF4_DQ)
    check_twins(twins[FASTPEFT], twins[PEFT])
    layers = [m for m in twins[FASTPEFT].modules() if isinstance(m, QuantLoRALinear)]
    assert len(layers) == 7 * config.model.num_hidden_layers
    ids = random_tokens(config)
    with torch.no_grad():
        assert_close(twins[FASTPEFT](input_ids=ids).logits, twins[PEFT](input_ids=ids).logits, torch.float32,
                     "logits")
    run = run_e2e(dataclasses.replace(config, quantizations=(NF4_DQ,)), log=lambda message: None)
    assert not run.failed and [r.impl for r in run.variant_results[NF4_DQ]] == [PEFT, FASTPEFT]
    assert run.ratio(TOKENS_PER_S, NF4_DQ) is not None and run.ratio(SAVED_BYTES, NF4_DQ).value > 0
    assert [c.target.label for c in run.target_checks(NF4_DQ)] == [
        ">= 1.5x PEFT's QLoRA tokens/s", "<= PEFT's QLoRA peak memory"]
    assert "### QLoRA (nf4-dq) training step" in e2e_markdown(run)
    assert any(line.startswith("  QLoRA (nf4-dq): ") for line in e2e_footer_lines(run))


def test_dora_twins_start_identical_and_take_the_same_step():
    """The DoRA variant: PEFT's DoRA model and its ``from_peft`` twin (``DoRALinear`` on every
    linear, magnitudes shared by name) start identical, give the same logits and, after a step
    without dropout, the same adapter (magnitudes included); the run reports both steps with
    their ratios, the DoRA targets and a JSON section."""
    from fastpeft.methods.lora.dora_layer import DoRALinear

    config = dataclasses.replace(TINY, dropout=0.0, dora=True)
    assert config.variants == (e2e.DORA,)
    twins = build_twins(config, e2e.DORA)
    layers = [m for m in twins[FASTPEFT].modules() if isinstance(m, DoRALinear)]
    assert len(layers) == 7 * config.model.num_hidden_layers
    ids = random_tokens(config)
    assert_close(logits(twins[FASTPEFT], ids), logits(twins[PEFT], ids), torch.float32, "logits")
    for model in twins.values():
        make_train_step(model, ids)()
    ours, theirs = (canonical_parameters(twins[name]) for name in (FASTPEFT, PEFT))
    trained = [name for name, p in ours.items() if p.requires_grad]
    assert any(name.endswith(".lora_magnitude_vector") for name in trained)
    for name in trained:
        assert_close(ours[name], theirs[name], torch.float32, name)
    run = run_e2e(config, log=lambda message: None)
    assert not run.failed and [r.impl for r in run.variant_results[e2e.DORA]] == [PEFT, FASTPEFT]
    assert run.ratio(TOKENS_PER_S, e2e.DORA) is not None and run.ratio(SAVED_BYTES, e2e.DORA).value > 0
    assert [c.target.label for c in run.target_checks(e2e.DORA)] == [
        ">= 2x PEFT's DoRA tokens/s", "<= PEFT's DoRA peak memory"]
    assert "### DoRA training step" in e2e_markdown(run)
    assert any(line.startswith("  DoRA: ") for line in e2e_footer_lines(run))
    data = e2e.e2e_json(run)
    assert data["dora"]["fastpeft_vs_peft"][SAVED_BYTES]["value"] > 0 and data["qlora"] == {}


def test_cli_e2e_writes_json_and_markdown_only(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(e2e, "CPU_E2E", TINY)
    assert main(["--e2e", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "End-to-end training step" in out and "fastpeft" in out
    assert "e2e" in json.loads((tmp_path / "bench.json").read_text())
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.startswith("# fastpeft bench") and "## End-to-end training step" in markdown
    assert not (tmp_path / "bench.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--e2e", "--quick"], "--quick cannot go with it"),
        (["--e2e", "--shapes", "q/o"], "--shapes cannot go with it"),
        (["--e2e", "--skip-e2e"], "not allowed with argument"),
        (["--quick", "--e2e-checkpointing"], "leaves the end-to-end case out"),
    ],
)
def test_cli_rejects_contradicting_e2e_options(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
