"""Every launch the quantized-weight launchers make on a GPU is a configuration that ``fastpeft
check`` compiles (``quant.specs``): the launchers run with the kernels replaced by recorders, on
problems ``decode_fits`` sends to the decode kernel on a GPU (16-bit compute dtypes, N and K
multiples of 16) and on every dequantization, and each launch's specialization (``launch_key``
of ``tests/helpers/launch_recorder.py``) must be a spec."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels.quant import launch  # noqa: E402
from fastpeft.kernels.quant.specs import quant_kernel_specs  # noqa: E402
from tests.helpers.launch_recorder import launch_key, record_launches, spec_key  # noqa: E402

CUDA = torch.device("cuda")
PAIRS = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
         (torch.float16, torch.float16)]
BLOCKSIZE, NESTED_BLOCKSIZE = 64, 256


def _weight(kind: str, n: int, k: int, storage: torch.dtype) -> tuple:
    """The launchers' weight arguments on the meta device: (quant_type, packed, absmax, code,
    nested_absmax, nested_code, offset, blocksize, nested_blocksize)."""
    meta = dict(device="meta")
    if kind == "int8":
        return ("int8", torch.empty(n, k, dtype=torch.int8, **meta), torch.empty(n, **meta), None, None, None, None,
                0, 0)
    blocks = n * k // BLOCKSIZE
    packed = torch.empty(n * k // 2 // storage.itemsize, 1, dtype=storage, **meta)
    if kind == "nf4":
        return "nf4", packed, torch.empty(blocks, **meta), torch.empty(16, **meta), None, None, None, BLOCKSIZE, 0
    return ("nf4", packed, torch.empty(blocks, dtype=torch.uint8, **meta), torch.empty(16, **meta),
            torch.empty(-(-blocks // NESTED_BLOCKSIZE), **meta), torch.empty(256, **meta), torch.empty((), **meta),
            BLOCKSIZE, NESTED_BLOCKSIZE)


def test_every_launch_is_checked(monkeypatch):
    from fastpeft.kernels import launch_device

    monkeypatch.setattr(launch_device, "interpreting", lambda: False)  # the launches a GPU makes
    recorded = record_launches(monkeypatch, launch)
    compiled = {spec_key(s) for s in quant_kernel_specs()}
    kernels = set()
    problems = itertools.product(("nf4-nested", "nf4", "int8"), (torch.uint8, torch.bfloat16), PAIRS, (16, 4096),
                                 (16, 4096), (1, 16), (1, 17, 64), (False, True))
    for kind, storage, (compute, lora), n, k, m, rank, bias in problems:
        assert launch.decode_fits(m, n, k, rank, compute, lora, CUDA)
        weight = _weight(kind, n, k, storage)
        recorded.clear()
        launch.decode_forward(torch.empty(m, k, dtype=compute, device="meta"), *weight,
                              torch.empty(n, dtype=compute, device="meta") if bias else None,
                              torch.empty(m, rank, dtype=lora, device="meta"),
                              torch.empty(n, rank, dtype=lora, device="meta"))
        launch.dequantize(*weight, (n, k), compute)
        for fn, args, kwargs in recorded:
            key = launch_key(fn, args, kwargs)
            assert key in compiled, f"{kind} {compute}/{lora} N={n} K={k} M={m} r={rank}: {key} is never compiled"
            kernels.add(key[0])
    assert kernels == {"qlora_decode_kernel", "dequant_4bit_kernel", "dequant_int8_kernel"}


@pytest.mark.parametrize("m,n,k,rank,compute,lora", [
    (17, 4096, 4096, 16, torch.bfloat16, torch.float32),  # a prefill: the dequantize-then-GEMM path
    (1, 4096, 4096, 65, torch.bfloat16, torch.float32),  # a rank the kernel does not pad
    (1, 4095, 4096, 16, torch.bfloat16, torch.float32),  # unaligned N: never compiled
    (1, 4096, 4096, 16, torch.float32, torch.float32),  # fp32 compute: the torch path on a GPU
])
def test_what_the_decode_kernel_does_not_take_on_a_gpu(m, n, k, rank, compute, lora):
    assert not launch.decode_fits(m, n, k, rank, compute, lora, CUDA)
