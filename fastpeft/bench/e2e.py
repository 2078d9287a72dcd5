"""End-to-end case of ``fastpeft bench``: one LoRA training step of a Llama model, fastpeft vs PEFT.

A transformers ``LlamaForCausalLM`` with random weights (built from a ``LlamaConfig``, nothing
downloaded) gets LoRA on every linear layer (``target_modules="all-linear"``, r 16, alpha 32,
dropout 0.05) from HF PEFT's ``get_peft_model``; its fastpeft twin is
``fastpeft.from_peft`` of a deep copy, so both start from the same base weights and the same
LoRA init, with the base frozen (``check_twins`` verifies all of it before anything is timed).
One step is: ``zero_grad``, forward with ``labels`` (mean next-token cross-entropy),
backward, AdamW step on the LoRA parameters, on one fixed batch of random tokens.

Measured per model, one model at a time on the device (the other waits in host memory):

- step time: median and interquartile range of the timed steps after warm-up
  (``timing.timed_calls_ms``: CUDA events on a GPU, ``time.perf_counter`` on CPU), and
  tokens/s = batch * seq_len / step time, with the range that gives;
- GPU: peak memory, ``torch.cuda.max_memory_allocated`` over one step after
  ``reset_peak_memory_stats`` (weights, LoRA parameters, AdamW state, activations);
- every device: bytes of the tensors autograd saves for backward in one forward
  (``memory.measure_saved_activations``, weights and the token ids excluded), the memory
  proxy on CPU, where torch's allocator has no peak statistics.

Every ratio is fastpeft / PEFT from the same run, with the range the two measurements' ranges
allow (a point for memory, which is deterministic); a target is met or missed only when that
whole range is on one side of it, inconclusive otherwise (``spread``).

Variants of the LoRA step (``E2EConfig.variants``): QLoRA, the same step on the model with its
decoder linears quantized by bitsandbytes (one per ``E2EConfig.quantizations``), and DoRA
(``E2EConfig.dora``: the same LoRA with ``use_dora=True``, fastpeft's twin from ``from_peft``),
each against PEFT's, with their own targets.

Prompt learning (``E2EConfig.prompt_methods``, on in the CLI's cases): the same Llama, batch
and step with PEFT's prompt tuning, then prefix tuning with its MLP (``prefix_projection``),
``NUM_VIRTUAL_TOKENS`` virtual tokens, fastpeft's twin from ``fastpeft.from_peft``: step
time, tokens/s, peak memory and saved bytes against PEFT's. Then greedy ``generate`` tokens/s
(KV cache on, ``DECODE_TOKENS`` new tokens per sequence after a ``DECODE_PROMPT_LEN``-token
prompt, prefill included) of the fastpeft model, prefix folded (``fastpeft.merge_prefix``),
against the same base model without an adapter: what the virtual tokens cost at inference.
PEFT 0.21's ``generate`` is not timed: on transformers 5 it does not compute the adapted
model (it re-adds the prompts at every step, or passes a prefix the model ignores).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import importlib.util
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

import fastpeft
from fastpeft.bench.environment import describe_environment, package_version
from fastpeft.bench.implementations import FASTPEFT, PEFT
from fastpeft.bench.memory import measure_saved_activations
from fastpeft.bench.qlora import NF4_DQ, quantize_linears
from fastpeft.methods.lora.layer import MAGNITUDE_KEY
from fastpeft.bench.report import (
    MISSING,
    format_bytes,
    format_ms,
    format_ratio,
    format_spread,
    markdown_table,
    plain_table,
)
from fastpeft.bench.errors import describe_error
from fastpeft.bench.runner import DEFAULT_DROPOUT, log_to_stderr
from fastpeft.bench.spread import Spread, ratio, spread_json
from fastpeft.bench.targets import Target
from fastpeft.bench.timing import ESTIMATE_CALLS, TimingBudget, timed_calls_ms
from fastpeft.methods.prompt.model import prompt_encoder

if TYPE_CHECKING:
    from transformers import LlamaConfig

# The LoRA setting: rank 16, alpha 32 (scaling 2) on every linear layer but the LM head.
LORA_RANK = 16
LORA_ALPHA = 32
TARGET_MODULES = "all-linear"
# A usual LoRA learning rate; its value does not change the time of a step.
LEARNING_RATE = 1e-4
# PEFT's name of the adapter ``get_peft_model`` creates, inside its parameter names.
PEFT_ADAPTER = "default"
# What PEFT's wrappers add to the parameter names of the model they wrap.
PEFT_PREFIX = "base_model.model."
# The models in the order they are measured (and reported): the reference first.
IMPLS = (PEFT, FASTPEFT)
# The one kind of work a row of this case describes (``Target.mode``).
TRAIN_STEP = "train step"
# Metrics of an ``E2EResult`` that the ratios and targets refer to.
TOKENS_PER_S, PEAK_BYTES, SAVED_BYTES = "tokens_per_s", "peak_bytes", "saved_bytes"
# The prompt-learning case's inference metric (fastpeft, prefix folded, against the base model).
DECODE_TOKENS_PER_S = "decode_tokens_per_s"

# The targets for this case on an H200, displayed, never asserted.
E2E_TARGETS: tuple[Target, ...] = (
    Target(">= 1.3x PEFT's tokens/s (dropout 0.05)", TRAIN_STEP, TOKENS_PER_S, 1.3, at_most=False, dropout=0.05),
    Target("<= 0.8x PEFT's peak memory (dropout 0.05)", TRAIN_STEP, PEAK_BYTES, 0.8, at_most=True, dropout=0.05),
)


# The QLoRA targets on a GPU (on the CPU it asks for no slower than PEFT), displayed,
# never asserted.
QLORA_E2E_TARGETS: tuple[Target, ...] = (
    Target(">= 1.5x PEFT's QLoRA tokens/s", TRAIN_STEP, TOKENS_PER_S, 1.5, at_most=False),
    Target("<= PEFT's QLoRA peak memory", TRAIN_STEP, PEAK_BYTES, 1.0, at_most=True),
)
# The DoRA variant's name, and issue "Fused DoRA"'s targets (GPU; on the CPU it asks for a step
# faster than PEFT's DoRA), displayed, never asserted.
DORA = "dora"
DORA_E2E_TARGETS: tuple[Target, ...] = (
    Target(">= 2x PEFT's DoRA tokens/s", TRAIN_STEP, TOKENS_PER_S, 2.0, at_most=False),
    Target("<= PEFT's DoRA peak memory", TRAIN_STEP, PEAK_BYTES, 1.0, at_most=True),
)


def variant_title(variant: str) -> str:
    """A variant of the LoRA step as reports name it: ``DoRA``, or ``QLoRA (<quantization>)``."""
    return "DoRA" if variant == DORA else f"QLoRA ({variant})"


def variant_targets(variant: str | None) -> tuple[Target, ...]:
    """The targets of the LoRA step (``variant`` None) or of a variant."""
    if variant is None:
        return E2E_TARGETS
    return DORA_E2E_TARGETS if variant == DORA else QLORA_E2E_TARGETS


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama model (``transformers.LlamaConfig`` fields)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    def config(self, max_positions: int) -> LlamaConfig:
        """The ``LlamaConfig``: no KV cache (training), PyTorch's SDPA attention (flash
        attention on a GPU in bf16), the LM head untied from the embedding (Llama's default)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            **dataclasses.asdict(self), max_position_embeddings=max_positions, use_cache=False,
            attn_implementation="sdpa",
        )


@dataclass(frozen=True)
class E2EConfig:
    """What the end-to-end case runs: model sizes, batch x seq_len tokens per step, device and
    dtype of the base model, LoRA dropout, gradient checkpointing, timing budget, seed."""

    model: LlamaShape
    batch: int
    seq_len: int
    device: torch.device
    dtype: torch.dtype
    budget: TimingBudget
    dropout: float = DEFAULT_DROPOUT
    gradient_checkpointing: bool = False
    seed: int = 0
    prompt_methods: tuple[str, ...] = ()
    # QLoRA: the same step on the model with its decoder linears quantized by bitsandbytes
    # (``fastpeft.bench.qlora.quantize_linears``), once per quantization named here.
    quantizations: tuple[str, ...] = ()
    # DoRA: the same step with use_dora=True.
    dora: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants of the LoRA step to run, in order: the quantizations, then DoRA."""
        return (*self.quantizations, *((DORA,) if self.dora else ()))

    def settings(self) -> dict[str, Any]:
        """The configuration as plain data, for reports."""
        on_gpu = self.device.type == "cuda"
        return {
            "transformers": package_version("transformers"),
            "model": {"architecture": "LlamaForCausalLM", **dataclasses.asdict(self.model)},
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch": self.batch,
            "seq_len": self.seq_len,
            "tokens_per_step": self.tokens,
            "lora": {"r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": self.dropout,
                     "target_modules": TARGET_MODULES},
            "optimizer": f"AdamW(lr={LEARNING_RATE}) on the LoRA parameters",
            "gradient_checkpointing": self.gradient_checkpointing,
            "step": "zero_grad, forward with labels (mean cross-entropy), backward, optimizer step",
            "timing": (
                "median and interquartile range of CUDA-event step times, L2 flushed before each" if on_gpu
                else "median and interquartile range of time.perf_counter step times"
            ),
            "timing_budget": vars(self.budget),
            "warmup_steps": WARMUP_STEPS,
            "memory": (
                "peak: torch.cuda.max_memory_allocated over one step after reset_peak_memory_stats, only this "
                "model on the GPU (with the timing's 256 MiB L2-flush buffer); saved: bytes autograd saves "
                "for backward in one forward"
                if on_gpu else
                "CPU: no peak statistics; the memory proxy is the bytes autograd saves for backward "
                "in one forward (saved_tensors_hooks, weights and token ids excluded)"
            ),
            "seed": self.seed,
            "qlora": {
                "quantizations": list(self.quantizations),
                "base": "the decoder's linear layers quantized by bitsandbytes (nf4-dq: NF4 with double quantization, "
                        "blocks of 64, compute dtype = the model's dtype), the LM head in full precision; the same "
                        "LoRA, batch and step",
            },
            "dora": {"on": self.dora, "step": "the same LoRA (use_dora=True), batch and step; PEFT's DoRA caching "
                                              "off (its default)"},
            "prompt_learning": {
                "methods": list(self.prompt_methods), "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
                "prefix": "prefix_projection=True (Embedding -> Linear -> Tanh -> Linear, hidden = token_dim)",
                "gradient_checkpointing": False,
                "decode": f"greedy generate, KV cache, batch {self.batch}, {DECODE_PROMPT_LEN}-token prompts, "
                          f"{DECODE_TOKENS} new tokens (prefill included), fastpeft with the prefix folded",
            },
        }


# GPU: a ~1.1B-parameter Llama (Llama-3.2-1B-like widths: hidden 2048, MLP 4x, 16 layers,
# 32 query / 8 KV heads of 64, Llama-2's 32000-token vocabulary) in bf16: big enough that its
# GEMMs fill an H200, ~2.2 GB of weights.
GPU_MODEL = LlamaShape(2048, 8192, 16, 32, 8, 32000)
# 8 sequences of 2048 tokens (16k tokens) per step: a few hundred ms of GPU work, so launch
# overhead does not matter, while the activations PEFT saves for backward (~60 GiB with its
# fp32 dropout copies of every LoRA input; fastpeft ~27 GiB: extrapolated from the saved bytes
# of 1- and 2-layer models of these widths on CPU) stay well within the H200's 140 GB.
GPU_BATCH, GPU_SEQ_LEN = 8, 2048
# Warm-up steps before the timed ones: ``timed_calls_ms`` runs one untimed call and
# ESTIMATE_CALLS that estimate the step time; the budgets below add no more (warmup_ms 0).
WARMUP_STEPS = 1 + ESTIMATE_CALLS
# A few seconds per model: the warm-up steps, then 10 timed steps; fixed counts keep the
# case's time predictable for scripts/gpu_run.sh.
GPU_E2E_BUDGET = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=10, max_reps=10)
# CPU: 4 layers of width 256 with the same shape ratios (MLP 4x, GQA 4:1) and an 8192-token
# vocabulary so the LM head does not dominate the step; 4 x 128 tokens, fp32: ~0.2 s a step
# on two cores, the whole case in well under 30 s.
CPU_MODEL = LlamaShape(256, 1024, 4, 8, 2, 8192)
CPU_BATCH, CPU_SEQ_LEN = 4, 128
# The warm-up steps (as on the GPU) and 10 timed steps: CPU step times vary with whatever else
# runs on the machine, and a median of 10 is steadier (~2 s per model).
CPU_E2E_BUDGET = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=10, max_reps=10)

PROMPT_TUNING, PREFIX_TUNING = "prompt tuning", "prefix tuning"
PROMPT_METHODS = (PROMPT_TUNING, PREFIX_TUNING)
# PEFT's examples use 20 virtual tokens for both methods (prompt tuning papers: 20-100).
NUM_VIRTUAL_TOKENS = 20
# Decode: short prompts and enough new tokens that the per-token steps, not the prefill,
# dominate the generate call; 3 timed calls (each already many decode steps).
DECODE_PROMPT_LEN, DECODE_TOKENS = 16, 32
DECODE_BUDGET = TimingBudget(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)
# The decode reference: the same Llama without an adapter.
BASE_MODEL = "base model"

GPU_E2E = E2EConfig(GPU_MODEL, GPU_BATCH, GPU_SEQ_LEN, torch.device("cuda"), torch.bfloat16, GPU_E2E_BUDGET,
                    prompt_methods=PROMPT_METHODS)
CPU_E2E = E2EConfig(CPU_MODEL, CPU_BATCH, CPU_SEQ_LEN, torch.device("cpu"), torch.float32, CPU_E2E_BUDGET,
                    prompt_methods=PROMPT_METHODS)


def default_e2e_config(device: torch.device, dtype: torch.dtype | None = None, **overrides: Any) -> E2EConfig:
    """The GPU or CPU case for ``device`` (its default dtype unless ``dtype``), with the QLoRA
    variant where bitsandbytes is installed and the DoRA variant, and ``overrides``
    (``dropout``, ``gradient_checkpointing``, ``seed``)."""
    template = GPU_E2E if device.type == "cuda" else CPU_E2E
    quantizations = (NF4_DQ,) if importlib.util.find_spec("bitsandbytes") is not None else ()
    return dataclasses.replace(template, device=device, dtype=dtype or template.dtype,
                               **{"quantizations": quantizations, "dora": True, **overrides})


def missing_packages() -> list[str]:
    """The packages the case needs (transformers, peft) that are not installed."""
    return [name for name in ("transformers", "peft") if package_version(name) is None]


# --- the twin models -----------------------------------------------------------------------


def build_peft_model(config: E2EConfig, variant: str | None = None) -> nn.Module:
    """The Llama model (seeded random weights, on ``config.device`` in ``config.dtype``; for a
    QLoRA ``variant`` its decoder linears quantized by bitsandbytes) with PEFT's LoRA (DoRA for
    the DoRA variant) on all linear layers, in training mode; only the adapter trains."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(config.seed)
    with torch.device(config.device):
        base = LlamaForCausalLM(config.model.config(config.seq_len)).to(config.dtype)
    if variant not in (None, DORA):
        quantize_linears(base, variant, config.dtype, config.device)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=config.dropout, target_modules=TARGET_MODULES,
                      use_dora=variant == DORA)
    with warnings.catch_warnings():
        # PEFT calls a transformers property transformers 5 deprecates; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, lora).train()


def _transformers_model(model: nn.Module) -> nn.Module:
    """The ``LlamaForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build_twins(config: E2EConfig, variant: str | None = None) -> dict[str, nn.Module]:
    """``{PEFT: PEFT model, FASTPEFT: its fastpeft twin}`` on ``config.device``, checked identical
    (``variant``: QLoRA's quantized base or DoRA, ``build_peft_model``)."""
    peft_model = build_peft_model(config, variant)
    twins = {PEFT: peft_model, FASTPEFT: fastpeft.from_peft(copy.deepcopy(peft_model)).train()}
    if config.gradient_checkpointing:
        for model in twins.values():
            _transformers_model(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    check_twins(twins[FASTPEFT], twins[PEFT])
    return twins


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their name in the plain transformers model: PEFT's wrapper prefix, its
    ``base_layer`` and adapter-name segments dropped, a DoRA magnitude under its saved key
    (fastpeft's layers already use these names)."""
    return {
        name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        .replace(f".{MAGNITUDE_KEY}.{PEFT_ADAPTER}.weight", f".{MAGNITUDE_KEY}").replace(f".{PEFT_ADAPTER}.", "."): p
        for name, p in model.named_parameters()
    }


def _is_lora(name: str) -> bool:
    """Whether a canonical parameter name is the adapter's (A, B, a DoRA magnitude)."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith(f".{MAGNITUDE_KEY}")


def check_twins(ours: nn.Module, theirs: nn.Module) -> None:
    """Raise ``RuntimeError`` unless both models have the same parameters (names, values) and
    exactly the LoRA parameters train in each (the base is frozen)."""
    mine, peft_params = canonical_parameters(ours), canonical_parameters(theirs)
    if mine.keys() != peft_params.keys():
        raise RuntimeError(f"twin models differ in parameters: {sorted(mine.keys() ^ peft_params.keys())[:4]}")
    for name, p in mine.items():
        q = peft_params[name]
        if p.requires_grad != _is_lora(name) or q.requires_grad != _is_lora(name):
            raise RuntimeError(f"{name}: trains in fastpeft {p.requires_grad}, in PEFT {q.requires_grad}; "
                               "only LoRA parameters must")
        if p.dtype != q.dtype or not torch.equal(p, q):
            raise RuntimeError(f"{name}: the twin models start from different values")


# --- one step, measured -------------------------------------------------------------------------


def training_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``input_ids`` (the labels are the ids)."""
    return model(input_ids=input_ids, labels=input_ids).loss


def make_train_step(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], None]:
    """One training step on ``input_ids`` with a fresh AdamW over the trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        training_loss(model, input_ids).backward()
        optimizer.step()

    return step


def random_tokens(config: E2EConfig) -> torch.Tensor:
    """The batch every step trains on: ``[batch, seq_len]`` random token ids, seeded."""
    generator = torch.Generator(config.device).manual_seed(config.seed)
    size = (config.batch, config.seq_len)
    return torch.randint(0, config.model.vocab_size, size, generator=generator, device=config.device)


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` over one call of ``step`` (CUDA only)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@dataclass(frozen=True)
class E2EResult:
    """One model's training step: time in ms and tokens/s (median and interquartile range of the
    timed steps), peak memory (GPU only, else None) and bytes saved for backward; all None and
    ``error`` set when it failed."""

    impl: str
    ms: Spread | None
    tokens_per_s: Spread | None
    peak_bytes: int | None
    saved_bytes: int | None
    error: str | None = None


def measure(impl: str, model: nn.Module, input_ids: torch.Tensor, config: E2EConfig) -> E2EResult:
    """Time ``model``'s training step, then its peak memory (GPU) and saved-for-backward bytes."""
    try:
        step = make_train_step(model, input_ids)
        ms = Spread.of_samples(timed_calls_ms(step, config.device, config.budget))
        peak = peak_step_memory(step, config.device) if config.device.type == "cuda" else None
        saved = measure_saved_activations(functools.partial(training_loss, model), input_ids, model.parameters())
        return E2EResult(impl, ms, ms.rate(config.tokens * 1e3), peak, saved.bytes)
    except Exception as exc:  # a failing model is reported; the other is still measured
        return E2EResult(impl, None, None, None, None, describe_error(exc))


# --- prompt learning ------------------------------------------------------------------------


def build_prompt_twins(config: E2EConfig, method: str) -> dict[str, nn.Module]:
    """``{PEFT: PEFT's prompt / prefix model, FASTPEFT: fastpeft.from_peft of a copy}`` on
    ``config.device``, in training mode, checked to start identical (same virtual-token
    weights, only they train)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    if method not in PROMPT_METHODS:
        raise ValueError(f"prompt method must be one of {PROMPT_METHODS}, got {method!r}")
    torch.manual_seed(config.seed)
    positions = NUM_VIRTUAL_TOKENS + max(config.seq_len, DECODE_PROMPT_LEN + DECODE_TOKENS)
    with torch.device(config.device):
        base = LlamaForCausalLM(config.model.config(positions)).to(config.dtype)
    peft_config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
                   if method == PROMPT_TUNING else
                   PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                                      prefix_projection=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(base, peft_config).train()
    twins = {PEFT: peft_model, FASTPEFT: fastpeft.from_peft(copy.deepcopy(peft_model)).train()}
    theirs = dict(peft_model.prompt_encoder[PEFT_ADAPTER].named_parameters())
    ours = dict(prompt_encoder(twins[FASTPEFT]).named_parameters())
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise RuntimeError(f"{method} twins start from different virtual-token weights")
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (twins[FASTPEFT], peft_model)]
    if counts[0] != counts[1] or counts[0] != sum(p.numel() for p in ours.values()):
        raise RuntimeError(f"{method} twins train {counts} parameters; only the virtual-token weights must")
    return twins


def decode_tokens_per_s(model: nn.Module, config: E2EConfig) -> Spread:
    """Greedy ``generate`` tokens/s of ``model`` (eval mode, KV cache on): ``batch`` random
    prompts of ``DECODE_PROMPT_LEN`` tokens, exactly ``DECODE_TOKENS`` new ones each."""
    generator = torch.Generator(config.device).manual_seed(config.seed + 1)
    prompts = torch.randint(1, config.model.vocab_size, (config.batch, DECODE_PROMPT_LEN),
                            generator=generator, device=config.device)
    settings = {"max_new_tokens": DECODE_TOKENS, "min_new_tokens": DECODE_TOKENS, "do_sample": False,
                "use_cache": True, "pad_token_id": 0}
    model.eval()
    try:
        with torch.no_grad():
            ms = Spread.of_samples(timed_calls_ms(
                lambda: model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **settings),
                config.device, DECODE_BUDGET))
    finally:
        model.train()
    return ms.rate(config.batch * DECODE_TOKENS * 1e3)


@dataclass(frozen=True)
class PromptResult:
    """One model of the prompt-learning case: ``train`` (the training step's E2EResult; None
    for the base model) and decode tokens/s (fastpeft and the base model; None for PEFT)."""

    method: str
    impl: str
    train: E2EResult | None
    decode_tokens_per_s: Spread | None = None
    error: str | None = None


def measure_prompt_method(config: E2EConfig, method: str, input_ids: torch.Tensor,
                          log: Callable[[str], None]) -> list[PromptResult]:
    """PEFT's and fastpeft's training step of ``method``, each alone on the device, then
    fastpeft's decode with the prefix folded."""
    try:
        twins = build_prompt_twins(config, method)
    except Exception as exc:
        return [PromptResult(method, impl, None, error=f"building the models: {describe_error(exc)}") for impl in IMPLS]
    results = []
    for impl in IMPLS:
        model = twins.pop(impl)
        _release(twins.values(), config.device)
        log(f"[e2e] {method}, {impl}: training step")
        train = measure(impl, model.to(config.device), input_ids, config)
        decode, error = None, train.error
        if impl == FASTPEFT and error is None:
            log(f"[e2e] {method}, {impl}: generate, prefix folded")
            try:
                if method == PREFIX_TUNING:
                    fastpeft.merge_prefix(model)
                decode = decode_tokens_per_s(model, config)
            except Exception as exc:
                error = f"generate: {describe_error(exc)}"
        results.append(PromptResult(method, impl, train, decode, error))
        del model
    return results


def measure_base_decode(config: E2EConfig) -> PromptResult:
    """The decode reference: the same seeded Llama without an adapter."""
    from transformers import LlamaForCausalLM

    try:
        torch.manual_seed(config.seed)
        positions = NUM_VIRTUAL_TOKENS + max(config.seq_len, DECODE_PROMPT_LEN + DECODE_TOKENS)
        with torch.device(config.device):
            base = LlamaForCausalLM(config.model.config(positions)).to(config.dtype)
        return PromptResult("-", BASE_MODEL, None, decode_tokens_per_s(base, config))
    except Exception as exc:
        return PromptResult("-", BASE_MODEL, None, error=f"generate: {describe_error(exc)}")


# --- the run --------------------------------------------------------------------------------


class E2ECheck(NamedTuple):
    """A target evaluated on the run: ``metric`` is the measurement it used (on CPU the memory
    target uses the saved-for-backward proxy), ``value`` the fastpeft / PEFT ratio with its
    range, ``verdict`` met, missed or inconclusive (``spread``)."""

    target: Target
    metric: str
    value: Spread
    verdict: str


def _measured(value: Spread | int | None) -> Spread | None:
    """A measurement as a Spread: byte counts are exact, so points."""
    return value if value is None or isinstance(value, Spread) else Spread.point(value)


@dataclass
class E2ERun:
    """The case's results (PEFT's, then fastpeft's) and ``settings`` (environment, config,
    parameter counts)."""

    settings: dict[str, Any]
    results: list[E2EResult] = field(default_factory=list)
    interrupted: bool = False
    prompt_results: list[PromptResult] = field(default_factory=list)
    # per variant of the LoRA step (``E2EConfig.variants``): its results, PEFT's then fastpeft's
    variant_results: dict[str, list[E2EResult]] = field(default_factory=dict)

    def step_results(self, variant: str | None = None) -> list[E2EResult]:
        """The results of the LoRA step (``variant`` None) or of a variant."""
        return self.results if variant is None else self.variant_results.get(variant, [])

    def result(self, impl: str, variant: str | None = None) -> E2EResult | None:
        """``impl``'s result of the LoRA step, or of a variant's."""
        return next((r for r in self.step_results(variant) if r.impl == impl), None)

    def ratio(self, metric: str, variant: str | None = None) -> Spread | None:
        """fastpeft's ``metric`` / PEFT's (``TOKENS_PER_S``, ``PEAK_BYTES``, ``SAVED_BYTES``), with
        its range (a point for the byte counts, which are exact), of the LoRA step or of a
        variant's."""
        ours, theirs = self.result(FASTPEFT, variant), self.result(PEFT, variant)
        if ours is None or theirs is None:
            return None
        return ratio(_measured(getattr(ours, metric)), _measured(getattr(theirs, metric)))

    @property
    def memory_metric(self) -> str:
        """The memory the targets use: peak on a GPU, the saved-for-backward proxy on CPU."""
        return PEAK_BYTES if self.settings["device"] == "cuda" else SAVED_BYTES

    def target_checks(self, variant: str | None = None) -> list[E2ECheck]:
        """The targets that apply at this run's dropout, on the ratios that were measured: the
        LoRA step's, or a variant's."""
        checks = []
        for target in variant_targets(variant):
            metric = self.memory_metric if target.metric == PEAK_BYTES else target.metric
            value = self.ratio(metric, variant)
            if value is not None and target.dropout in (None, self.settings["lora"]["lora_dropout"]):
                checks.append(E2ECheck(target, metric, value, target.verdict(value)))
        return checks

    def prompt_ratio(self, method: str, metric: str) -> Spread | None:
        """fastpeft / PEFT of a training-step ``metric`` of a prompt ``method``, or, for
        ``DECODE_TOKENS_PER_S``, fastpeft's decode tokens/s / the base model's."""
        rows = {(r.method, r.impl): r for r in self.prompt_results}
        ours = rows.get((method, FASTPEFT))
        if metric == DECODE_TOKENS_PER_S:
            base = next((r for r in self.prompt_results if r.impl == BASE_MODEL), None)
            return None if ours is None or base is None else ratio(ours.decode_tokens_per_s, base.decode_tokens_per_s)
        theirs = rows.get((method, PEFT))
        if ours is None or theirs is None or ours.train is None or theirs.train is None:
            return None
        return ratio(_measured(getattr(ours.train, metric)), _measured(getattr(theirs.train, metric)))

    @property
    def errors(self) -> list[str]:
        return ([f"e2e {r.impl}: {r.error}" for r in self.results if r.error]
                + [f"e2e {variant_title(v)} {r.impl}: {r.error}" for v, rs in self.variant_results.items()
                   for r in rs if r.error]
                + [f"e2e {r.method} {r.impl}: {r.error}" for r in self.prompt_results if r.error])

    @property
    def failed(self) -> bool:
        """A model failed, or the run was interrupted (missed targets do not count)."""
        return bool(self.errors) or self.interrupted


def _record_model(settings: dict[str, Any], model: nn.Module) -> None:
    """Add the built fastpeft twin's parameter counts, LoRA layer count and adapter dtype
    (PEFT's default: float32 LoRA weights, also on a 16-bit model) to ``settings``."""
    counts = fastpeft.trainable_parameters(model)
    layers = [m for m in model.modules() if isinstance(m, fastpeft.LoRALinear)]
    settings["model"].update(parameters=counts.total, trainable_parameters=counts.trainable)
    settings["lora"].update(layers=len(layers), adapter_dtype=str(layers[0].lora_A.weight.dtype).removeprefix("torch."))


def _release(models: Iterable[nn.Module], device: torch.device) -> None:
    """Move ``models`` to host memory and return freed device memory to the driver."""
    for model in models:
        model.to("cpu")
    gc.collect()  # PEFT's wrappers hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_twins(config: E2EConfig, input_ids: torch.Tensor, variant: str | None, log: Callable[[str], None],
                  results: list[E2EResult], settings: dict[str, Any] | None = None) -> None:
    """Build the twin models (of ``variant``, if given: ``build_peft_model``) and measure PEFT's
    step, then fastpeft's, each alone on the device, appending each result to ``results`` as it
    is measured (an interrupted run keeps them); a model that cannot be built gives both
    results an error. ``settings``: where to record the fastpeft twin's counts."""
    try:
        twins = build_twins(config, variant)
    except Exception as exc:  # no model to measure; report why (the rest of the case still runs)
        results.extend(E2EResult(impl, None, None, None, None, f"building the models: {describe_error(exc)}")
                       for impl in IMPLS)
        return
    if settings is not None:
        _record_model(settings, twins[FASTPEFT])
    for impl in IMPLS:
        model = twins.pop(impl)
        _release(twins.values(), config.device)
        log(f"[e2e] {impl}: {config.batch} x {config.seq_len} tokens per step")
        results.append(measure(impl, model.to(config.device), input_ids, config))
        if results[-1].error:
            log(f"  {impl} failed: {results[-1].error}")
        del model


def run_e2e(config: E2EConfig, log: Callable[[str], None] = log_to_stderr) -> E2ERun:
    """Build the twin models and measure PEFT's step, then fastpeft's, each alone on the device.

    A failure is recorded in the results and the run goes on; Ctrl-C (or ``timeout -s INT``)
    stops it and keeps what was measured.
    """
    run = E2ERun(settings={**describe_environment(config.device), **config.settings()})
    try:
        log(f"[e2e] building the Llama model and its LoRA twins ({config.device.type}, {run.settings['dtype']})")
        input_ids = random_tokens(config)
        measure_twins(config, input_ids, None, log, run.results, run.settings)
        for variant in config.variants:
            _release((), config.device)
            log(f"[e2e] {variant_title(variant)}: the same model and step")
            measure_twins(config, input_ids, variant, log, run.variant_results.setdefault(variant, []))
        _release((), config.device)
        for method in config.prompt_methods:
            run.prompt_results.extend(measure_prompt_method(config, method, input_ids, log))
            _release((), config.device)
        if config.prompt_methods:
            log(f"[e2e] {BASE_MODEL}: generate")
            run.prompt_results.append(measure_base_decode(config))
            _release((), config.device)
    except KeyboardInterrupt:
        run.interrupted = True
        log("interrupted: reporting the end-to-end results measured so far")
    return run


# --- reports ----------------------------------------------------------------------------------

E2E_HEADERS = ["impl", "step ms", "tokens/s", "x PEFT", "peak memory", "x PEFT", "saved for bwd", "x PEFT"]


def _ratio_cell(run: E2ERun, metric: str, checks: dict[str, E2ECheck], variant: str | None) -> str:
    value = run.ratio(metric, variant)
    if value is None:
        return MISSING
    check = checks.get(metric)
    return format_ratio(value, None if check is None else check.verdict)


def e2e_table_rows(run: E2ERun, variant: str | None = None) -> list[list[str]]:
    """One row per model of the LoRA step (or of a variant's): step time and tokens/s (median
    and interquartile range), peak memory, saved bytes; fastpeft's row has the fastpeft / PEFT
    ratios (with their ranges and target marks)."""
    checks = {c.metric: c for c in run.target_checks(variant)}
    rows = []
    for r in run.step_results(variant):
        if r.error:
            rows.append([r.impl, "error"] + [MISSING] * (len(E2E_HEADERS) - 2))
            continue
        ratios = [_ratio_cell(run, m, checks, variant) if r.impl == FASTPEFT else MISSING
                  for m in (TOKENS_PER_S, PEAK_BYTES, SAVED_BYTES)]
        rows.append([
            r.impl, format_spread(r.ms, format_ms), format_spread(r.tokens_per_s, "{:,.0f}".format), ratios[0],
            MISSING if r.peak_bytes is None else format_bytes(r.peak_bytes), ratios[1],
            format_bytes(r.saved_bytes), ratios[2],
        ])
    return rows


PROMPT_HEADERS = ["method", "impl", "step ms", "tokens/s", "x PEFT", "peak memory", "x PEFT", "saved for bwd",
                  "x PEFT", "generate tokens/s", "x base"]


def prompt_table_rows(run: E2ERun) -> list[list[str]]:
    """One row per prompt-learning model: training step as in the LoRA table (ratios on
    fastpeft's rows), and generate tokens/s (fastpeft: prefix folded; its ratio to the base
    model's), then the base model's generate row."""
    rows = []
    for r in run.prompt_results:
        if r.error and r.train is None:
            rows.append([r.method, r.impl, "error"] + [MISSING] * (len(PROMPT_HEADERS) - 3))
            continue
        t = r.train
        ours = r.impl == FASTPEFT

        def cell(metric: str) -> str:
            value = run.prompt_ratio(r.method, metric) if ours else None
            return MISSING if value is None else format_ratio(value)

        train = [MISSING] * 7 if t is None or t.error else [
            format_spread(t.ms, format_ms), format_spread(t.tokens_per_s, "{:,.0f}".format), cell(TOKENS_PER_S),
            MISSING if t.peak_bytes is None else format_bytes(t.peak_bytes), cell(PEAK_BYTES),
            format_bytes(t.saved_bytes), cell(SAVED_BYTES),
        ]
        decode = MISSING if r.decode_tokens_per_s is None else format_spread(r.decode_tokens_per_s, "{:,.0f}".format)
        rows.append([r.method, r.impl, *train, decode, cell(DECODE_TOKENS_PER_S)])
    return rows


def prompt_header_lines(run: E2ERun) -> list[str]:
    p = run.settings["prompt_learning"]
    return [
        f"Prompt learning on the same model and batch: {', '.join(p['methods'])}; {p['num_virtual_tokens']} virtual "
        f"tokens; prefix: {p['prefix']}; gradient checkpointing off; AdamW on the virtual-token weights",
        f"generate: {p['decode']}; 'x base' = fastpeft / the model without adapter. PEFT 0.21's generate is not "
        "timed: on transformers 5 it does not compute the adapted model",
    ]


def _count(n: int) -> str:
    """A parameter count as 1.10B / 8.3M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def e2e_header_lines(run: E2ERun) -> list[str]:
    s = run.settings
    m, lora = s["model"], s["lora"]
    size = f"{_count(m['parameters'])} parameters" if "parameters" in m else "not built"
    return [
        f"End-to-end training step  {s['date']}  {s['device']}: {s['device_name']}  "
        f"torch {s['torch']}  transformers {s['transformers']}  peft {s['peft']}  fastpeft {s['fastpeft']}",
        f"model: LlamaForCausalLM, random weights, {size} (hidden {m['hidden_size']}, intermediate "
        f"{m['intermediate_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']}/"
        f"{m['num_key_value_heads']} heads, vocab {m['vocab_size']}), {s['dtype']}; "
        f"batch {s['batch']} x seq {s['seq_len']} = {s['tokens_per_step']} tokens per step",
        f"LoRA r={lora['r']} alpha={lora['lora_alpha']} dropout {lora['lora_dropout']} on {lora['target_modules']} "
        f"({lora.get('layers', '?')} layers, {_count(m.get('trainable_parameters', 0))} trainable parameters, "
        f"adapter weights in {lora.get('adapter_dtype', '?')} (PEFT's default)); {s['optimizer']}; "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; same weights and LoRA init in both",
        f"step: {s['step']}; timing: {s['timing']}, {s['timing_budget']['min_reps']} timed steps after "
        f"{s['warmup_steps']} warm-up steps",
        f"memory: {s['memory']}; 'x PEFT' = fastpeft / PEFT",
        "step ms and tokens/s: median (interquartile range) of the timed steps; 'x PEFT' of tokens/s: ratio of "
        "the medians (lowest-highest ratio the two ranges allow); memory is exact",
    ]


def e2e_footer_lines(run: E2ERun) -> list[str]:
    lines = [
        "End-to-end targets for fastpeft (on an H200; displayed, not asserted), judged on the ratio's range: "
        "met, missed, or inconclusive when the range reaches the target:"
    ]
    checks = [(None, c) for c in run.target_checks()] + [
        (v, c) for v in run.variant_results for c in run.target_checks(v)]
    for variant, c in checks:
        proxy = " (CPU proxy: bytes saved for backward)" if c.metric == SAVED_BYTES else ""
        step = "" if variant is None else f"{variant_title(variant)}: "
        lines.append(f"  {step}{c.target.label}{proxy}: {format_ratio(c.value)} {c.verdict}")
    if not checks:
        lines.append("  none applies to this run (they are stated at dropout 0.05, for runs that measured both)")
    if run.interrupted:
        lines.append("INTERRUPTED: the end-to-end case stopped early.")
    if run.errors:
        lines.append(f"Errors ({len(run.errors)}):")
        lines.extend(f"  {e}" for e in run.errors)
    return lines


def variant_header_line(run: E2ERun, variant: str) -> str:
    s = run.settings
    return f"{variant_title(variant)}: {s['dora']['step'] if variant == DORA else s['qlora']['base']}"


def e2e_markdown(run: E2ERun) -> str:
    """The case's report as a markdown section."""
    fence = "```"
    variants = [line for v in run.variant_results for line in (
        f"### {variant_title(v)} training step", "", fence, variant_header_line(run, v), fence, "",
        markdown_table(E2E_HEADERS, e2e_table_rows(run, v)), "")]
    prompt = [] if not run.prompt_results else [
        "### Prompt tuning and prefix tuning", "", fence, *prompt_header_lines(run), fence, "",
        markdown_table(PROMPT_HEADERS, prompt_table_rows(run)), ""]
    return "\n".join(
        ["## End-to-end training step: fastpeft vs PEFT", "", fence, *e2e_header_lines(run), fence, "",
         markdown_table(E2E_HEADERS, e2e_table_rows(run)), "", *variants, *prompt, fence, *e2e_footer_lines(run),
         fence, ""]
    )


def print_e2e_report(run: E2ERun) -> None:
    """Print the case's report to stdout as plain text."""
    print("\n".join(e2e_header_lines(run)))
    print(plain_table(E2E_HEADERS, e2e_table_rows(run), text_columns=1))
    for variant in run.variant_results:
        print(variant_header_line(run, variant))
        print(plain_table(E2E_HEADERS, e2e_table_rows(run, variant), text_columns=1))
    if run.prompt_results:
        print("\n".join(prompt_header_lines(run)))
        print(plain_table(PROMPT_HEADERS, prompt_table_rows(run), text_columns=2))
    print("\n".join(e2e_footer_lines(run)))


def _checks_json(checks: list[E2ECheck]) -> list[dict[str, Any]]:
    return [{"target": c.target.label, "metric": c.metric, "value": spread_json(c.value), "verdict": c.verdict}
            for c in checks]


def _variant_json(run: E2ERun, variant: str) -> dict[str, Any]:
    return {
        "results": [dataclasses.asdict(r) for r in run.variant_results[variant]],
        "fastpeft_vs_peft": {metric: spread_json(run.ratio(metric, variant))
                             for metric in (TOKENS_PER_S, PEAK_BYTES, SAVED_BYTES)},
        "targets": _checks_json(run.target_checks(variant)),
    }


def e2e_json(run: E2ERun) -> dict[str, Any]:
    """The case as plain data: settings, per-model results (ms and tokens/s as
    ``{"value", "low", "high"}``, bytes), the fastpeft / PEFT ratios (the same, exact ones as
    points) and the target checks with their verdicts."""
    return {
        "settings": run.settings,
        "interrupted": run.interrupted,
        "results": [dataclasses.asdict(r) for r in run.results],
        "fastpeft_vs_peft": {
            metric: spread_json(run.ratio(metric)) for metric in (TOKENS_PER_S, PEAK_BYTES, SAVED_BYTES)
        },
        "targets": _checks_json(run.target_checks()),
        "qlora": {q: _variant_json(run, q) for q in run.variant_results if q != DORA},
        "dora": _variant_json(run, DORA) if DORA in run.variant_results else None,
        "prompt_learning": [
            {"method": r.method, "impl": r.impl, "train": None if r.train is None else dataclasses.asdict(r.train),
             DECODE_TOKENS_PER_S: spread_json(r.decode_tokens_per_s), "error": r.error}
            for r in run.prompt_results
        ],
        "prompt_learning_ratios": {
            method: {metric: spread_json(run.prompt_ratio(method, metric))
                     for metric in (TOKENS_PER_S, PEAK_BYTES, SAVED_BYTES, DECODE_TOKENS_PER_S)}
            for method in run.settings.get("prompt_learning", {}).get("methods", [])
        },
    }

