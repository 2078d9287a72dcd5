"""Dropout of the LoRA op: the kernels' Philox mask against its torch twin, keep rates and
independence of the masks the op draws on each backend, reproducibility under
``torch.manual_seed``, and what the op saves (which mask where: ``tests/ops/test_dropout.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from fastpeft.backend import triton_available
from fastpeft.kernels.dropout_mask import keep_mask_philox
from fastpeft.ops import lora_linear, lora_linear_dropout_mask, lora_linear_ref
from fastpeft.ops.dropout import keep_mask_torch_path, mask_follows_seed
from tests.helpers.devices import DEVICE
from tests.helpers.lora_problem import SCALING, make_problem


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("m,k", [(1, 1), (5, 7), (33, 130), (64, 64)])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, 2**62 - 1])
def test_kernel_mask_is_bit_identical_to_torch(m, k, seed):
    from fastpeft.kernels.lora.launch import dropout_keep_mask

    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    kernel = dropout_keep_mask(seed_t, m, k, 0.3)
    assert torch.equal(kernel, keep_mask_philox(seed_t, m, k, 0.3))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_rate_within_statistical_bounds(backend, p):
    m, k = 211, 301
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    keep = keep_mask_torch_path(seed, m, k, p)  # the op's draw on this backend (the kernels' bits under triton)
    n = m * k
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Neighbouring columns share a Philox call: their keep decisions must still be independent.
    both = (keep[:, 0::4][:, :75] & keep[:, 1::4][:, :75]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / (m * 75))


def test_different_seeds_give_different_masks(backend):
    if not mask_follows_seed(DEVICE):
        pytest.skip("the torch path on CUDA draws from torch's CUDA generator, not from the seed")
    a = lora_linear_dropout_mask(torch.tensor([1], device=DEVICE), 40, 40, 0.5)
    b = lora_linear_dropout_mask(torch.tensor([2], device=DEVICE), 40, 40, 0.5)
    assert not torch.equal(a, b)


def test_same_torch_seed_same_output(backend):
    pb = make_problem((17,), 40, 24, 4, torch.float32)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, 0.5, training=True)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_no_dropout_outside_training(backend):
    pb = make_problem((17,), 40, 24, 4, torch.float32)
    y = lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, 0.5, training=False)
    ref = lora_linear_ref(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING)
    torch.testing.assert_close(y, ref)


def test_dropout_changes_the_lora_term_only(backend):
    pb = make_problem((17,), 40, 24, 4, torch.float32)
    pb.lora_b.zero_()
    y = lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, SCALING, 0.5, training=True)
    torch.testing.assert_close(y, torch.nn.functional.linear(pb.x, pb.weight, pb.bias))


def test_saves_no_activation_copy(backend):
    """With dropout 0.1 the op saves, beyond x and the weights, at most M x r fp32 elements
    plus scalars, and on the torch path its bool M x K keep-mask (PEFT saves an extra M x K
    copy of x, 4 bytes an element here)."""
    m, k, n, r = 64, 96, 80, 8
    pb = make_problem((m,), k, n, r, torch.float32)
    a = pb.lora_a.requires_grad_()
    b = pb.lora_b.requires_grad_()
    x = pb.x.requires_grad_()
    known = {t.untyped_storage().data_ptr() for t in (x, pb.weight, pb.bias, a, b)}
    extra: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            extra[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, pb.weight, pb.bias, a, b, SCALING, 0.1, training=True)
    y.sum().backward()
    scalar_slack = 64  # the seed (8 bytes) and allocator rounding of tiny tensors
    mask_bytes = m * k if backend == "torch" else 0
    assert sum(extra.values()) <= m * r * 4 + mask_bytes + scalar_slack, extra
