"""The DoRA op on a GPU (skipped without CUDA; ``scripts/gpu_run.sh`` runs it): the LoRA kernels
with DoRA's epilogue (``FASTPEFT_BACKEND=triton``, the tensor-core paths the interpreter cannot
run: bf16 / fp16 activations with fp32 or 16-bit adapters, decode, medium and large M, the
sm_90 128x128 tile, split-K) and the torch path on CUDA, against PEFT's float64 math, forward
and every gradient."""

from __future__ import annotations

import pytest
import torch

from tests.ops.test_dora_linear import SCALING, inputs, reference, run_op
from tests.helpers.numerics import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("m,k,n,r", [(1, 4096, 4096, 16), (300, 1024, 2048, 64), (4096, 2048, 2048, 16),
                                     (33, 4096, 64, 8)])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_against_float64(monkeypatch, backend, m, k, n, r, dtype, lora_dtype):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    t = {key: (value.cuda() if value is not None else None)
         for key, value in inputs(m, k, n, r, dtype, lora_dtype=lora_dtype).items()}
    expected = reference({key: (v.cpu() if v is not None else None) for key, v in t.items()}, SCALING)
    got = run_op(t, SCALING, probe=expected["probe"].cuda())
    for key in ("y", "dx", "dlora_a", "dlora_b", "dmagnitude"):
        assert_close(got[key].double().cpu(), expected[key], dtype, f"{backend} {key}")
