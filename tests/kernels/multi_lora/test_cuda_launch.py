"""The CUDA C++ multi-LoRA decode kernels (csrc/bgmv.cu) through their launcher
(fastpeft.kernels.multi_lora.cuda_launch.multi_lora_decode), run on the CPU by the kernels'
emulation (tests/helpers/cuda_emulation.py), against a per-token float64 reference.

The slots' padding (rows/columns past each adapter's rank) holds NaN, so reading any of it
shows; rows whose id is outside [0, L) must come back bit for bit unchanged (no slot read).
"""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.multi_lora.cuda_launch import multi_lora_decode
from tests.helpers.cuda_emulation import emulate_cuda_kernels
from tests.helpers.multi_lora_decode import check_decode_case


@pytest.fixture
def emulated(monkeypatch):
    return emulate_cuda_kernels(monkeypatch)


@pytest.mark.parametrize(
    ("num_tokens", "k", "n", "dtype", "lora_dtype"),
    [
        pytest.param(1, 37, 300, torch.float32, torch.float32, id="T1-fp32"),
        pytest.param(5, 64, 129, torch.float16, torch.float32, id="T5-fp16-fp32adapters"),
        pytest.param(67, 45, 257, torch.bfloat16, torch.bfloat16, id="T67-bf16"),
    ],
)
def test_decode_matches_per_token_reference(emulated, num_tokens, k, n, dtype, lora_dtype):
    check_decode_case(num_tokens, k, n, dtype, lora_dtype)


def test_bad_dtype_pair_and_rank_limit_raise_clearly(emulated):
    x, y = torch.randn(2, 8), torch.randn(2, 6)
    ids, ranks, scalings = torch.tensor([0, 0]), torch.tensor([4]), torch.ones(1)
    with pytest.raises(ValueError, match="x's dtype or float32"):
        multi_lora_decode(y, x, torch.randn(1, 4, 8).half(), torch.randn(1, 6, 4).half(), scalings, ids, ranks)
    with pytest.raises(ValueError, match=r"R_max must be in \[1, 256\]"):
        multi_lora_decode(y, x, torch.randn(1, 257, 8), torch.randn(1, 6, 257), scalings, ids, ranks)
