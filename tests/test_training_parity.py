"""Training with fastpeft's LoRA layers matches HF PEFT on small transformers models, and
gradient checkpointing (dropout included) gives the gradients of a plain run.

Models are built from transformers configs with random weights (nothing is downloaded):
a 2-layer Llama and a 2-layer GPT-2, whose linears are transformers ``Conv1D`` (weight
``[in, out]``, PEFT's ``fan_in_fan_out``). The toy task is counting: each sequence runs
``t, t+1, t+2, ...`` mod the vocabulary from a random start, so the next token is always
predictable and a LoRA adapter on the attention and MLP projections learns it in a
few hundred steps. LoRA is added with ``fastpeft.inject`` or, to start from PEFT's exact
init, converted from a PEFT model with ``fastpeft.from_peft``. ``one_thread``,
``shift_batch``, ``lora_model`` and ``lora_grads`` are shared with ``tests/test_distributed.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import fastpeft
from tests.helpers.numerics import TOLERANCE, relative_error

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
RANK, ALPHA = 8, 16
# LoRA targets per architecture: every projection of attention and MLP (not the LM head).
TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: at these sizes threads only add overhead, and on a busy
    machine (CI runners, the distributed tests' ranks) spinning OpenMP threads slow the
    runs down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def build_model(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer, 64-wide causal LM (``"llama"`` or ``"gpt2"``) with random weights, fp32,
    no dropout of its own.

    ``initializer_range=0.2`` (not 0.02): the frozen output head then has weights large
    enough for the final norm's unit-RMS features to reach confident predictions, so the
    adapter can drive the loss far down.
    """
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.2,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    return transformers.GPT2LMHeadModel(config)


def shift_batch(generator: torch.Generator | None = None, batch: int = 8, length: int = 16) -> torch.Tensor:
    """``[batch, length]`` token ids counting up by one (mod ``VOCAB``) from random starts
    drawn from ``generator`` (torch's default one if None)."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % VOCAB


def lora_config(arch: str, dropout: float = 0.0, library=fastpeft):
    """The LoRA config of these tests, as a ``fastpeft.LoraConfig`` or (``library=peft``) a
    ``peft.LoraConfig``: rank 8, alpha 16, every ``TARGETS[arch]`` projection."""
    return library.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                              target_modules=list(TARGETS[arch]), fan_in_fan_out=arch == "gpt2")


def lora_model(arch: str, dropout: float = 0.0) -> nn.Module:
    """``build_model(arch)`` with LoRA added by ``fastpeft.inject`` and ``lora_B`` drawn from
    N(0, 0.1) instead of PEFT's zeros, so that ``lora_A`` gets nonzero gradients too
    (B = 0 gives dA = 0)."""
    model = fastpeft.inject(build_model(arch), lora_config(arch, dropout))
    for module in model.modules():
        if isinstance(module, fastpeft.LoRALinear):
            nn.init.normal_(module.lora_B.weight, std=0.1)
    return model


ARCHS = ["llama", "gpt2"]


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the trainable (LoRA) parameters, by name."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _twin_models(arch: str, dropout: float) -> tuple[nn.Module, nn.Module]:
    """``(fastpeft model, PEFT model)`` with the same base weights and LoRA init: a PEFT
    model and a copy of it converted by ``fastpeft.from_peft``."""
    theirs = peft.get_peft_model(build_model(arch), lora_config(arch, dropout, library=peft))
    return fastpeft.from_peft(copy.deepcopy(theirs)), theirs


def _train(model: nn.Module, steps: int, seed: int = 1, lr: float = 1e-2) -> torch.Tensor:
    """AdamW on the trainable parameters over ``steps`` fresh counting batches drawn from
    ``seed`` (which also seeds dropout); returns the per-step training losses."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        ids = shift_batch(generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


STEPS = 200
TAIL = 10  # final loss = mean over the last TAIL steps


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_loss_curve_matches_peft(arch, dropout):
    """Same init, batches and seed: fastpeft's loss curve follows PEFT's, and both fall far.

    Without dropout the two runs differ only in fp32 rounding (fastpeft folds the scaling
    into the rank-r side and sums in another order): each of the first steps agrees to fp32
    tolerance, and the final loss (seen within 1e-4 after 200 Adam steps, as rounding
    differences grow) to 2e-3. With dropout the masks differ (fastpeft draws its own), so
    only the final losses are compared, loosely (seen within 11%): dropout in the fused op
    trains as stably as PEFT's. Both runs must cut the loss by more than 3x (it falls
    10-60x without dropout, ~4-20x with it).
    """
    ours, theirs = _twin_models(arch, dropout)
    losses_ours, losses_peft = _train(ours, STEPS), _train(theirs, STEPS)
    final_ours, final_peft = losses_ours[-TAIL:].mean(), losses_peft[-TAIL:].mean()
    for name, losses, final in (("fastpeft", losses_ours, final_ours), ("peft", losses_peft, final_peft)):
        assert final < 0.3 * losses[0], f"{name}: loss {losses[0]:.3f} -> {final:.3f} did not fall enough"
    if dropout == 0.0:
        per_step = (losses_ours[:10] - losses_peft[:10]).abs() / losses_peft[:10]
        assert per_step.max() <= TOLERANCE[torch.float32], f"first 10 steps: relative differences {per_step}"
    final_tol = 2e-3 if dropout == 0.0 else 0.3
    rel = abs(final_ours - final_peft) / final_peft
    assert rel <= final_tol, f"final loss fastpeft {final_ours:.4f} vs peft {final_peft:.4f} (rel {rel:.2e})"


def _grads_of_one_step(model: nn.Module, ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """LoRA gradients of one training-mode forward/backward, with dropout seeded by ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    return lora_grads(model)


def _count_lora_forwards(model: nn.Module) -> list[int]:
    """A one-element counter of LoRALinear forward calls, recomputations included (a
    pre-hook: checkpointing's early stop can end a recomputation inside a layer's forward)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for module in model.modules():
        if isinstance(module, fastpeft.LoRALinear):
            module.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_gives_same_grads(backend, arch, dropout):
    """Non-reentrant checkpointing recomputes every LoRA layer in the backward; the
    gradients equal the plain run's. With dropout, the recomputed forward must redraw the
    same masks (torch.utils.checkpoint restores the RNG state the op draws its seed from):
    a different mask would change the gradients by O(1), as a run with another seed shows.
    """
    model = lora_model(arch, dropout)
    model.train()
    ids = shift_batch(batch=2, length=8)
    calls = _count_lora_forwards(model)

    plain = _grads_of_one_step(model, ids, seed=3)
    plain_calls = calls[0]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls[0] = 0
    checkpointed = _grads_of_one_step(model, ids, seed=3)
    assert calls[0] == 2 * plain_calls, "checkpointing did not recompute the LoRA layers"

    lora_layers = sum(isinstance(m, fastpeft.LoRALinear) for m in model.modules())
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * lora_layers == 2 * plain_calls
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, f"{name}: zero gradient"
        err = relative_error(checkpointed[name], grad)
        assert err <= 1e-6, f"{name}: checkpointed gradient relative error {err:.2e}"
    if dropout > 0.0:
        other_seed = _grads_of_one_step(model, ids, seed=4)
        errs = [relative_error(other_seed[n], g) for n, g in plain.items()]
        assert max(errs) > 1e-2, "dropout did not change the gradients: the comparison above proves nothing"
