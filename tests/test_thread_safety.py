"""One model, calls from several threads at once: every output equals the single-threaded
reference for its own input, and no call raises. A serving process runs requests from several
threads, so per-call state must not live in one holder shared by the threads:

* models adapted by ``fastpeft.inject`` (LoRA, prompt and prefix tuning, bottleneck adapters:
  the residual each bottleneck site hands from its pre-hook to its hook is kept per thread);
* ``MultiAdapterModel``: ``forward`` / ``generate`` with different ``adapter_names`` per
  thread, concurrent ``load_adapter`` calls, and ``unload_adapter`` + ``load_adapter`` into the
  freed slot while forwards still use it.

Tiny random models on the CPU. ``interleaved`` makes every module call of the model yield to
the other threads, so that the threads interleave inside each forward every time."""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

import fastpeft
from tests.helpers.models import VOCAB, tiny_llama
from tests.helpers.peft_adapters import LLAMA_ADAPTERS, save_adapters

THREADS = 8
ROUNDS = 3


def in_threads(work: Callable[[int], None], threads: int = THREADS) -> None:
    """``work(i)`` for i in ``range(threads)``, each in its own thread (in the caller's grad
    mode), all started together; re-raises the first exception a thread raised."""
    start = threading.Barrier(threads, timeout=60)
    grad = torch.is_grad_enabled()

    def run(i: int) -> None:
        start.wait()
        with torch.set_grad_enabled(grad):
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


# --- MultiAdapterModel ----------------------------------------------------------------------

# Four different adapters (each saved with its own seed).
ADAPTERS = {**LLAMA_ADAPTERS, "qv4": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, dict]:
    base = tiny_llama()
    return base, save_adapters(base, ADAPTERS, tmp_path_factory.mktemp("adapters"))


def serving(base: torch.nn.Module, dirs: dict, max_adapters: int = 4) -> fastpeft.MultiAdapterModel:
    model = fastpeft.MultiAdapterModel(copy.deepcopy(base), max_adapters=max_adapters, max_rank=16)
    for name, directory in dirs.items():
        model.load_adapter(name, directory)
    return model


@torch.no_grad()
def test_forward_and_generate_in_threads_each_get_their_own_adapters(saved):
    base, dirs = saved
    model = serving(base, dirs)
    # Thread i: a batch of two sequences with its own pair of adapters (None: the base); odd
    # threads generate.
    names = random.Random(0).sample(list(itertools.permutations([*dirs, None], 2)), THREADS)
    batches = [torch.cat([ids, ids.flip(1)]) for ids in inputs(THREADS)]

    def call(i: int) -> torch.Tensor:
        if i % 2:
            return model.generate(input_ids=batches[i], adapter_names=names[i], max_new_tokens=3, do_sample=False,
                                  pad_token_id=0)
        return model(input_ids=batches[i], adapter_names=names[i]).logits

    expected = [call(i) for i in range(THREADS)]

    def work(i: int) -> None:
        for _ in range(ROUNDS):
            torch.testing.assert_close(call(i), expected[i], rtol=1e-5, atol=1e-5)

    with interleaved(model.model):
        in_threads(work)


@torch.no_grad()
def test_concurrent_loads_get_one_slot_each(saved):
    base, dirs = saved
    names = list(dirs)
    reference = serving(base, dirs)
    ids = inputs(1)[0]
    expected = {name: reference(input_ids=ids, adapter_names=[name]).logits for name in names}
    for _ in range(ROUNDS):
        model = serving(base, {})
        slots = {}

        def load(i: int) -> None:
            slots[names[i]] = model.load_adapter(names[i], dirs[names[i]])

        in_threads(load, threads=len(names))
        assert model.adapters == slots and sorted(slots.values()) == list(range(len(names)))
        for name in dirs:
            torch.testing.assert_close(model(input_ids=ids, adapter_names=[name]).logits, expected[name],
                                       rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unload_and_load_into_the_freed_slot_while_forwards_use_it(saved):
    """Forwards run "x" (or "y") next to "keep" while one thread swaps x and y, which share the
    one slot that "keep" leaves: each forward that runs gets exactly its adapters' output (the
    slot is rewritten only when the forwards that use it have finished); one that starts while
    its adapter is not loaded raises ValueError."""
    base, dirs = saved
    x, y, keep = list(dirs)[:3]
    reference = serving(base, {name: dirs[name] for name in (x, y, keep)})
    model = serving(base, {x: dirs[x], keep: dirs[keep]}, max_adapters=2)
    ids = torch.cat(inputs(2))
    expected = {name: reference(input_ids=ids, adapter_names=[name, keep]).logits for name in (x, y)}
    swaps, ran, done = 4, [], threading.Event()

    def swap() -> None:
        loaded, other = x, y
        try:
            for _ in range(swaps):
                while len(ran) < 2 and not done.is_set():  # until forwards have run (or one failed)
                    time.sleep(1e-4)
                if done.is_set():
                    return
                ran.clear()
                freed = model.adapters[loaded]
                model.unload_adapter(loaded)
                assert model.load_adapter(other, dirs[other]) == freed
                loaded, other = other, loaded
        finally:
            done.set()

    def forward() -> None:
        try:
            while not done.is_set():
                for name in (x, y):
                    try:
                        got = model(input_ids=ids, adapter_names=[name, keep]).logits
                    except ValueError as e:  # between an unload and the load after it
                        assert "not loaded" in str(e)
                        time.sleep(1e-4)
                        continue
                    torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5)
                    ran.append(name)
        finally:
            done.set()  # a failed forward stops the others

    with interleaved(model.model):
        in_threads(lambda i: swap() if i == 0 else forward(), threads=4)


@contextlib.contextmanager
def paused_forward(model: fastpeft.MultiAdapterModel, ids: torch.Tensor, names: list) -> Iterator[Future]:
    """``model(input_ids=ids, adapter_names=names).logits`` in another thread, held inside the
    model (before its ``lm_head``) until the block ends: yields its future."""
    inside, resume = threading.Event(), threading.Event()

    def pause(*_) -> None:
        if not inside.is_set():
            inside.set()
            assert resume.wait(timeout=60)

    def call() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, adapter_names=names).logits

    handle = model.model.lm_head.register_forward_pre_hook(pause)
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call)
            try:
                assert inside.wait(timeout=60)
                yield future
            finally:
                resume.set()
    finally:
        handle.remove()


def slot_weights(model: fastpeft.MultiAdapterModel, slot: int) -> list[torch.Tensor]:
    return [t[slot].clone() for layer in model.layers.values() for t in (layer.lora_A, layer.lora_B, layer.ranks)]


def test_an_unloaded_slot_is_kept_until_the_calls_using_it_finish(saved):
    """A forward held inside the model while its adapter is unloaded still gets that adapter's
    output; the slot is emptied when the forward finishes, and a load that needs the slot
    waits for it."""
    base, dirs = saved
    x, y = list(dirs)[:2]
    model = serving(base, {x: dirs[x]}, max_adapters=1)
    ids = inputs(1)[0]
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=[x]).logits
    weights = slot_weights(model, 0)
    with paused_forward(model, ids, [x]) as running:
        model.unload_adapter(x)
        assert model.adapters == {}
        with pytest.raises(ValueError, match="not loaded"):
            model(input_ids=ids, adapter_names=[x])
        assert all(map(torch.equal, slot_weights(model, 0), weights)), "emptied while a forward uses it"
    torch.testing.assert_close(running.result(), expected, rtol=0, atol=0)
    assert not any(t.any() for t in slot_weights(model, 0)), "not emptied after its last forward"

    model.load_adapter(x, dirs[x])
    with ThreadPoolExecutor(1) as pool:
        with paused_forward(model, ids, [x]) as running:
            model.unload_adapter(x)
            loading = pool.submit(model.load_adapter, y, dirs[y])
            time.sleep(0.2)
            assert not loading.done(), "load_adapter must wait for the forward still using the slot"
            assert all(map(torch.equal, slot_weights(model, 0), weights)), "rewritten while a forward uses it"
        torch.testing.assert_close(running.result(), expected, rtol=0, atol=0)
        assert loading.result() == 0 and model.adapters == {y: 0}
