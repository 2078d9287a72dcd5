"""The CUDA C++ multi-LoRA decode kernels (csrc/bgmv.cu) through their launcher
(fastpeft.kernels.multi_lora.cuda_launch.multi_lora_decode), run on the CPU by the kernels'
emulation (tests/helpers/cuda_emulation.py), against a per-token float64 reference.

The slots' padding (rows/columns past each adapter's rank) holds NaN, so reading any of it
shows; rows whose id is outside [0, L) must come back bit for bit unchanged (no slot read).
The kernels split K and N over many blocks and add the pieces in a fixed order: the results
must not change, bit for bit, when the emulation runs the blocks in another order (as a GPU
may), nor between 16-byte vector loads and element-by-element loads of the same values.
"""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.multi_lora.cuda_launch import multi_lora_decode
from tests.helpers.cuda_emulation import block_order, emulate_cuda_kernels
from tests.helpers.multi_lora_decode import check_decode_case, decode_reference, padded_slots
from tests.helpers.numerics import assert_close


@pytest.fixture
def emulated(monkeypatch):
    return emulate_cuda_kernels(monkeypatch)


@pytest.mark.parametrize(
    ("num_tokens", "k", "n", "dtype", "lora_dtype"),
    [
        pytest.param(1, 37, 300, torch.float32, torch.float32, id="T1-fp32"),
        pytest.param(5, 64, 129, torch.float16, torch.float32, id="T5-fp16-fp32adapters"),
        pytest.param(67, 45, 257, torch.bfloat16, torch.bfloat16, id="T67-bf16"),
        # 3 slices of K (the last 76 wide, its last group 4 wide), 4 blocks of 85 columns.
        pytest.param(3, 1100, 300, torch.bfloat16, torch.float32, id="T3-K1100-bf16-fp32adapters"),
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


def _shifted(t: torch.Tensor, shift: int) -> torch.Tensor:
    """``t``'s values, contiguous, starting ``shift`` elements past a fresh allocation (which
    torch aligns to 64 bytes): shift 0 keeps every group 16-byte aligned, 1 none of them."""
    buf = torch.empty(t.numel() + shift, dtype=t.dtype)[shift:]
    return buf.view(t.shape).copy_(t)


def _decode_problem(num_tokens, k, n, r_max, dtype, lora_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_slots = 3
    ranks = torch.tensor([r_max, 5, r_max + 7], dtype=torch.int64)  # full, a tail group, clamped
    lora_a, lora_b = padded_slots(num_slots, r_max, k, n, ranks, lora_dtype, g)
    scalings = torch.tensor([0.5, -2.0, 1.25])
    ids = torch.tensor([0, 2, -1, 1, 0, 3, 2][:num_tokens] + [1] * max(0, num_tokens - 7), dtype=torch.int64)
    x = torch.randn(num_tokens, k, generator=g).to(dtype)
    y = torch.randn(num_tokens, n, generator=g).to(dtype)
    return y, x, lora_a, lora_b, scalings, ids, ranks


def _run(y, x, lora_a, lora_b, scalings, ids, ranks, shift=0):
    """``multi_lora_decode`` on copies of the operands placed ``shift`` elements off alignment."""
    out = _shifted(y, shift)
    multi_lora_decode(out, _shifted(x, shift), _shifted(lora_a, shift), _shifted(lora_b, shift), scalings, ids, ranks)
    return out


@pytest.mark.parametrize(
    ("num_tokens", "k", "n", "r_max", "dtype", "lora_dtype"),
    [
        # 5 slices of K (2100 = 4 x 512 + 52), 6 row blocks, 3 groups per row of B: 85-column blocks.
        pytest.param(2, 2100, 301, 24, torch.float16, torch.float16, id="fp16-K2100-N301"),
        # One token, 2 slices, R_max 64: 16 row blocks, 32-column blocks of y.
        pytest.param(1, 1000, 129, 64, torch.float32, torch.float32, id="fp32-T1-R64"),
        pytest.param(9, 777, 67, 8, torch.bfloat16, torch.float32, id="bf16-fp32adapters-odd"),
    ],
)
def test_split_is_bitwise_reproducible_in_any_block_order(emulated, num_tokens, k, n, r_max, dtype, lora_dtype):
    """The shrink's K slices and row blocks and the expand's column blocks, run in index order
    and in two shuffled orders, give bitwise equal y, within the float64 reference's tolerance."""
    problem = _decode_problem(num_tokens, k, n, r_max, dtype, lora_dtype)
    y0, x, lora_a, lora_b, scalings, ids, ranks = problem
    runs = []
    for order in (0, 1, 12345):
        with block_order(order):
            runs.append(_run(*problem))
    assert all(torch.equal(runs[0], other) for other in runs[1:]), "the result depends on the block order"
    assert_close(runs[0], decode_reference(y0, x, lora_a, lora_b, scalings, ids, ranks), dtype, "y")


@pytest.mark.parametrize(("dtype", "lora_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_vector_and_element_loads_give_the_same_bits(emulated, dtype, lora_dtype):
    """Aligned operands with K, R_max multiples of 8 read every whole group with 16-byte loads
    (only the rank-5 slot's partial group of B element by element); the same values one
    element off alignment read every group element by element: the same bits."""
    ext = emulated
    problem = _decode_problem(4, 1032, 40, 16, dtype, lora_dtype)  # K = 2 x 512 + 8
    ext.emulation_load_counts()
    aligned = _run(*problem)
    vector, scalar = ext.emulation_load_counts()
    assert vector > 0 and scalar > 0, (vector, scalar)
    shifted = _run(*problem, shift=1)
    vector_shifted, scalar_shifted = ext.emulation_load_counts()
    assert vector_shifted == 0 and scalar_shifted == vector + scalar, (vector_shifted, scalar_shifted)
    assert torch.equal(aligned, shifted)
    assert_close(aligned, decode_reference(*problem), dtype, "y")


def test_no_tokens_or_empty_k(emulated):
    """T = 0 is a no-op; K = 0 adds s * 0 (y keeps its values)."""
    y, x, lora_a, lora_b, scalings, ids, ranks = _decode_problem(3, 16, 24, 8, torch.float32, torch.float32)
    empty = torch.empty(0, 24)
    multi_lora_decode(empty, x[:0], lora_a, lora_b, scalings, ids[:0], ranks)
    before = y.clone()
    multi_lora_decode(y, x[:, :0], lora_a[:, :, :0], lora_b, scalings, ids, ranks)
    assert torch.equal(y, before)
