"""``fastpeft.MultiLoRALinear``: preallocated adapter slots on one base linear, loaded and
cleared in place, run per token against the float64 reference; several adapters trained in
one batch (each slot's gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.methods.lora.multi_layer import TokenAdapterIds
from fastpeft.ops import multi_lora_linear_ref
from tests.helpers.numerics import assert_close

IN, OUT = 19, 23


def _layer(seed: int = 0) -> fastpeft.MultiLoRALinear:
    torch.manual_seed(seed)
    return fastpeft.MultiLoRALinear(nn.Linear(IN, OUT), max_adapters=3, max_rank=8)


def _adapter(rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, IN, generator=g), torch.randn(OUT, rank, generator=g)


def _expected(layer, x, ids):
    return multi_lora_linear_ref(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                                 layer.lora_B.double(), layer.scalings.double(), ids, layer.ranks)


def test_slots_load_clear_in_place_and_run_per_token():
    layer = _layer()
    pointers = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.scalings.data_ptr(), layer.ranks.data_ptr())
    layer.load_slot(0, *_adapter(8, 1), scaling=2.0)
    layer.load_slot(0, *_adapter(2, 2), scaling=0.5)  # a smaller adapter over a larger one
    layer.load_slot(2, *_adapter(5, 3), scaling=1.5)
    assert torch.equal(layer.lora_A[0, 2:], torch.zeros(6, IN)) and torch.equal(layer.lora_B[0, :, 2:], torch.zeros(OUT, 6))
    assert layer.ranks.tolist() == [2, 0, 5]
    x = torch.randn(4, 3, IN)
    ids = torch.tensor([[0, 2, -1], [2, 2, 0], [1, -1, 0], [0, 0, 0]])  # slot 1 is empty: base output
    assert_close(layer(x, adapter_ids=ids), _expected(layer, x, ids), torch.float32, "y")
    layer.clear_slot(2)
    y = layer(x, adapter_ids=ids)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(y[ids == 2], base[ids == 2]), "a cleared slot must give the base output"
    assert pointers == (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.scalings.data_ptr(),
                        layer.ranks.data_ptr()), "a slot change reallocated"
    torch.testing.assert_close(layer(x), base)  # no ids: the base linear


def test_shared_ids_expand_per_sequence():
    holder = TokenAdapterIds()
    torch.manual_seed(0)
    layer = fastpeft.MultiLoRALinear(nn.Linear(IN, OUT), max_adapters=2, max_rank=4, token_ids=holder)
    layer.load_slot(1, *_adapter(3, 4), scaling=1.0)
    x = torch.randn(4, 5, IN)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    with holder.bind(torch.tensor([1, -1])):  # two sequences, each repeated twice (beams)
        tokens = torch.tensor([1, 1, -1, -1])[:, None].expand(4, 5)
        assert_close(layer(x), _expected(layer, x, tokens), torch.float32, "y")
        with holder.bind(None):  # nested: the inner ids, then the outer ones again
            torch.testing.assert_close(layer(x), base)
        assert_close(layer(x), _expected(layer, x, tokens), torch.float32, "y")
    assert holder.ids is None
    torch.testing.assert_close(layer(x), base)
    with holder.bind(torch.tensor([1, -1, 0])), pytest.raises(ValueError, match="one adapter name per sequence"):
        layer(x)
    for bad in ([1, -1], torch.tensor([[1, -1]])):
        with pytest.raises(TypeError, match="ids must be a 1-D tensor"), holder.bind(bad):
            pass


def test_bad_slots_and_adapters():
    layer = _layer()
    with pytest.raises(ValueError, match="slot must be an int in"):
        layer.load_slot(3, *_adapter(2, 0), scaling=1.0)
    with pytest.raises(ValueError, match="max_rank 8"):
        layer.load_slot(0, *_adapter(9, 0), scaling=1.0)
    with pytest.raises(ValueError, match="lora_b has shape"):
        layer.load_slot(0, _adapter(2, 0)[0], torch.zeros(OUT, 3), scaling=1.0)
    with pytest.raises(TypeError, match="base_layer must be one of bitsandbytes Linear4bit, bitsandbytes Linear8bitLt, "
                                        "torch.nn.Linear with a torchao Int8Tensor weight, torch.nn.Linear with a "
                                        "torchao NF4Tensor weight, torch.nn.Linear, transformers Conv1D, got Conv1d"):
        fastpeft.MultiLoRALinear(nn.Conv1d(2, 2, 1), max_adapters=1, max_rank=1)
    with pytest.raises(ValueError, match="max_adapters must be"):
        fastpeft.MultiLoRALinear(nn.Linear(2, 2), max_adapters=0, max_rank=1)


def test_several_adapters_train_in_one_batch():
    """Multi-tenant fine-tuning: each slot's gradient equals its own tokens' LoRA gradient."""
    layer = _layer(1)
    layer.load_slot(0, *_adapter(3, 5), scaling=2.0)
    layer.load_slot(1, *_adapter(8, 6), scaling=0.25)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    x = torch.randn(9, IN, requires_grad=True)
    ids = torch.tensor([1, 0, 0, -1, 1, 1, 0, 2, 1])
    grad = torch.randn(9, OUT)
    layer(x, adapter_ids=ids).backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B)]
    ref = multi_lora_linear_ref(leaves[0], layer.weight.double(), layer.bias.double(), leaves[1], leaves[2],
                                layer.scalings.double(), ids, layer.ranks)
    ref.backward(grad.double())
    for got, want, what in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), (v.grad for v in leaves),
                               ("dX", "dA", "dB")):
        assert_close(got, want, torch.float32, what)
    assert torch.equal(layer.lora_A.grad[2], torch.zeros(8, IN)), "an unused slot gets no gradient"
