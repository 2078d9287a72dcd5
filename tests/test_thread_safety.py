"""One model, calls from several threads at once: every output equals the single-threaded
reference for its own input, and no call raises. A serving process runs requests from several
threads, so per-call state must not live in one holder shared by the threads:

* models adapted by ``fastpeft.inject`` (LoRA, prompt and prefix tuning, bottleneck adapters:
  the residual each bottleneck site hands from its pre-hook to its hook is kept per thread);

Tiny random models on the CPU; each thread repeats its call so that the threads interleave
inside the model (torch releases the GIL in its ops)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastpeft
from tests.model_helpers import VOCAB, tiny_llama

THREADS = 8
ROUNDS = 3


def in_threads(work: Callable[[int], None], threads: int = THREADS) -> None:
    """``work(i)`` for i in ``range(threads)``, each in its own thread, all started together;
    re-raises the first exception a thread raised."""
    start = threading.Barrier(threads, timeout=60)

    def run(i: int) -> None:
        start.wait()
        work(i)

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(run, i) for i in range(threads)]:
            future.result()


@contextlib.contextmanager
def interleaved(model: torch.nn.Module) -> Iterator[None]:
    """Every module of ``model`` sleeps briefly before it runs (after the model's own pre-hooks),
    releasing the GIL: the other threads then run inside the same forward, between any two
    module calls, every time rather than by chance."""
    handles = [m.register_forward_pre_hook(lambda *_: time.sleep(1e-5)) for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def inputs(count: int, length: int = 6) -> list[torch.Tensor]:
    """``count`` different token sequences, each a batch of 1."""
    return [torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(count)]


def perturb(model: torch.nn.Module) -> None:
    """Random adapter weights (the trainable parameters), so that every adapter changes the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


INJECTED = {
    "lora": lambda: fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "prompt": lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix": lambda: fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "seq_bn": lambda: fastpeft.AdapterConfig("seq_bn"),
    "par_bn": lambda: fastpeft.AdapterConfig("par_bn"),
    "double_seq_bn": lambda: fastpeft.AdapterConfig("double_seq_bn"),
}


@pytest.mark.parametrize("method", INJECTED)
@torch.no_grad()
def test_injected_model_forwards_in_threads(method):
    model = fastpeft.inject(tiny_llama(), INJECTED[method]())
    perturb(model)
    batches = inputs(THREADS)
    expected = [model(input_ids=ids).logits for ids in batches]

    def work(i: int) -> None:
        for _ in range(ROUNDS):
            torch.testing.assert_close(model(input_ids=batches[i]).logits, expected[i], rtol=1e-5, atol=1e-5)

    with interleaved(model):
        in_threads(work)


@pytest.mark.parametrize("preset", ["seq_bn", "par_bn"])
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")  # renamed in transformers 5
def test_bottleneck_gradient_checkpointing_in_threads(preset):
    """Training steps in threads, with each layer's forward (and so its residual hooks) rerun
    in the backward: every thread gets its own input's gradients."""
    model = fastpeft.inject(tiny_llama(), fastpeft.AdapterConfig(preset)).train()
    perturb(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    batches = inputs(THREADS)

    def gradients(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, params)

    expected = [gradients(ids) for ids in batches]

    def work(i: int) -> None:
        for _ in range(ROUNDS):
            for got, want in zip(gradients(batches[i]), expected[i], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    with interleaved(model):
        in_threads(work)
