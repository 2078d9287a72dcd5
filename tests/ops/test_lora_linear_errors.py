"""Bad input to the LoRA op: a ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops import lora_linear


def args(**over):
    base = dict(
        x=torch.randn(4, 16),
        weight=torch.randn(8, 16),
        bias=torch.randn(8),
        lora_a=torch.randn(2, 16),
        lora_b=torch.randn(8, 2),
        scaling=1.0,
        dropout_p=0.0,
    )
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over,exc,words",
    [
        (dict(x=torch.randn(4, 15)), ValueError, ["x", "(4, 15)", "16"]),
        (dict(x=[[1.0]]), TypeError, ["x", "list"]),
        (dict(x=torch.randn(4, 16, dtype=torch.complex64)), TypeError, ["x", "complex64", "float64"]),
        (dict(x=torch.zeros(4, 16, dtype=torch.int32)), TypeError, ["x", "int32"]),
        (dict(x=torch.tensor(1.0)), ValueError, ["x", "at least 1"]),
        (dict(weight=torch.randn(8, 16, 1)), ValueError, ["weight", "2-D"]),
        (dict(weight=torch.randn(8, 16, dtype=torch.float16)), TypeError, ["weight", "float16", "float32"]),
        (dict(bias=torch.randn(7)), ValueError, ["bias", "(7,)", "(8,)"]),
        (dict(bias=torch.randn(8, dtype=torch.float16)), TypeError, ["bias", "float16"]),
        (dict(lora_a=torch.randn(2, 15)), ValueError, ["lora_a", "(2, 15)", "16"]),
        (dict(lora_b=torch.randn(8, 3)), ValueError, ["lora_b", "(8, 3)", "rank 2"]),
        (dict(lora_b=torch.randn(9, 2)), ValueError, ["lora_b", "(9, 2)", "8"]),
        (dict(lora_a=torch.randn(0, 16), lora_b=torch.randn(8, 0)), ValueError, ["rank 0", "r must be >= 1"]),
        (dict(lora_b=torch.randn(8, 2, dtype=torch.float16)), TypeError, ["lora_b", "float16", "lora_a"]),
        (dict(lora_a=torch.randn(2, 16, device="meta")), ValueError, ["lora_a on meta", "x on cpu"]),
        (dict(dropout_p=-0.1), ValueError, ["dropout_p", "[0, 1)", "-0.1"]),
        (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
        (dict(dropout_p="0.1"), TypeError, ["dropout_p", "str"]),
        (dict(scaling=float("nan")), ValueError, ["scaling", "finite"]),
    ],
)
def test_bad_input_names_argument(backend, over, exc, words):
    with pytest.raises(exc) as info:
        lora_linear(**args(**over))
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_unknown_backend_setting(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        lora_linear(**args())
