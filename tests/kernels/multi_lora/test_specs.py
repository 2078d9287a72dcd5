"""Every launch the multi-adapter LoRA launchers make is a configuration that ``fastpeft
check`` compiles (``multi_lora.specs``): the launchers run with every kernel replaced by a
recorder, on problems the op sends to the kernels on a GPU (16-bit activations, K and N
multiples of 16), and each launch's specialization (``launch_key`` of
``tests/helpers/launch_recorder.py``) must be a spec."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels.multi_lora import launch  # noqa: E402
from fastpeft.kernels.multi_lora.specs import multi_lora_kernel_specs  # noqa: E402
from tests.helpers.launch_recorder import GPUS, launch_key, record_launches, spec_key  # noqa: E402

DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.float16, torch.float32)]
TOKENS = [1, 33, 600]  # decode, small segments (16-row tiles), large (64-row)
SLOT_RANKS = [1, 17, 64, 65, 256]
WIDTHS = [16, 4096]


@pytest.fixture
def recorded(monkeypatch) -> list:
    return record_launches(monkeypatch, launch)


@pytest.mark.parametrize("gpu", GPUS, ids=str)
@pytest.mark.parametrize("act,lora", DTYPES, ids=str)
def test_every_launch_is_checked(recorded, monkeypatch, gpu, act, lora):
    """Each launch over the grid of problems is a compiled spec, on a simulated A100 and H100
    (their SM counts pick the decode splits and column blocks and the segment shrink's
    splits, so whether the expand sums partials)."""
    from fastpeft.kernels.lora import configs as lora_configs

    monkeypatch.setattr(lora_configs, "device_info", lambda device: gpu)
    compiled = {spec_key(s) for s in multi_lora_kernel_specs()}
    kernels = set()
    for t, r_max, n, k in itertools.product(TOKENS, SLOT_RANKS, WIDTHS, WIDTHS):
        num_slots = 3
        x, y = torch.empty(t, k, dtype=act), torch.empty(t, n, dtype=act)
        a, b = torch.empty(num_slots, r_max, k, dtype=lora), torch.empty(num_slots, n, r_max, dtype=lora)
        scalings = torch.ones(num_slots)
        ids = torch.arange(t, dtype=torch.int64) % (num_slots + 1) - 1
        ranks = torch.full((num_slots,), r_max, dtype=torch.int64)
        recorded.clear()
        launch.multi_lora_decode(y, x, a, b, scalings, ids, ranks)
        launch.multi_lora_segments_add(y, x, a, b, scalings, ids, ranks)
        launch.multi_lora_backward(y, x, torch.empty(t, k, dtype=act), a, b, scalings, ids, ranks, True, True)
        for fn, args, kwargs in recorded:
            key = launch_key(fn, args, kwargs)
            assert key in compiled, f"T={t} R_MAX={r_max} N={n} K={k}: {key} is never compiled"
            kernels.add(key[0])
    assert kernels == {"multi_lora_decode_shrink_kernel", "multi_lora_decode_expand_kernel", "multi_lora_shrink_kernel",
                       "multi_lora_expand_kernel", "multi_lora_wgrad_kernel"}


@pytest.mark.parametrize("num_tokens", [1, 16])
@pytest.mark.parametrize("n", [4096, 14336])
@pytest.mark.parametrize("r_max", [8, 16, 32, 64])
def test_decode_grids_fill_an_h100(recorded, monkeypatch, num_tokens, n, r_max):
    """Issue 19 at the plan's decode shapes (K = 4096, 64 slots): on a simulated H100 (132 SMs)
    the shrink's grid (T, rank blocks of 4, K splits) and the expand's (T, column blocks) each
    hold at least one program per SM, or, where K's 64-column steps cannot give that many
    (T = 1, r = 8: 2 rank blocks x 64 steps), one program per step. The shrink adds no split
    beyond twice the fewest that fill a wave, and the expand is told how many partials to sum."""
    from fastpeft.kernels.lora import configs as lora_configs

    monkeypatch.setattr(lora_configs, "device_info", lambda device: (132, 90))
    k, num_slots = 4096, 64
    x, y = torch.empty(num_tokens, k, dtype=torch.bfloat16), torch.empty(num_tokens, n, dtype=torch.bfloat16)
    a = torch.empty(num_slots, r_max, k, dtype=torch.bfloat16)
    b = torch.empty(num_slots, n, r_max, dtype=torch.bfloat16)
    ranks = torch.full((num_slots,), r_max, dtype=torch.int64)
    ids = torch.arange(num_tokens, dtype=torch.int64)
    launch.multi_lora_decode(y, x, a, b, torch.ones(num_slots), ids, ranks)
    names = [launch_key(fn, args, kwargs)[0] for fn, args, kwargs in recorded]
    shrink = recorded.grids[names.index("multi_lora_decode_shrink_kernel")]
    expand = recorded.grids[names.index("multi_lora_decode_expand_kernel")]
    rank_programs = num_tokens * -(-r_max // 4)
    assert shrink[:2] == (num_tokens, -(-r_max // 4))
    assert shrink[0] * shrink[1] * shrink[2] >= min(132, rank_programs * k // 64), shrink
    assert shrink[2] <= 2 * -(-132 // rank_programs), shrink  # at most twice the fewest splits that fill a wave
    assert expand[0] * expand[1] >= 132, expand
    fn, args, kwargs = recorded[names.index("multi_lora_decode_expand_kernel")]
    assert dict(zip(fn.arg_names, args))["num_splits"] == shrink[2]


# Compiles the named specs for sm_90 in a fresh interpreter (the tests may run under
# TRITON_INTERPRET, which makes the kernels uncompilable in this process) and prints, per
# spec, its count of 16-byte global loads in the PTX.
_COUNT_VECTOR_LOADS = """
import re, sys
from fastpeft import check
from fastpeft.kernels.multi_lora.specs import multi_lora_kernel_specs
for spec in multi_lora_kernel_specs():
    if spec.name in sys.argv[1:]:
        (job,) = check._make_jobs(spec, ["sm_90"])
        ptx, _ = check._compile_to_ptx(job)
        print(spec.name, len(re.findall(r"ld[.]global[.][^ ]*v4[.]b32", ptx)))
"""


def test_decode_kernels_load_16_byte_vectors():
    """Issue 19: the decode kernels read the adapters in 16-byte vectors (PTX ``ld.global.v4``),
    as many as their tiles need, for bf16 activations with bf16 or fp32 adapters: the shrink
    its [4, 64] slices of A_i, the expand with R_ALIGN 8 its whole [BLOCK_N, 16] blocks of B_i
    and [32, 16] of fp32 partials (each thread's share of a tile, in 16-byte loads). With
    R_ALIGN 1 nothing is known of B's row stride and every load is scalar."""
    wanted = {s.name: s for s in multi_lora_kernel_specs()
              if s.name.startswith("multi_lora_decode_") and "bf16/" in s.name}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COUNT_VECTOR_LOADS, *wanted], env=env, capture_output=True, text=True,
                         check=True).stdout
    counts = {name: int(count) for name, count in (line.rsplit(" ", 1) for line in out.splitlines())}
    assert counts.keys() == wanted.keys()
    for name, spec in wanted.items():
        lanes_bytes = 16 * 32 * spec.num_warps  # one 16-byte load by every thread
        adapter_bytes = 4 if "/fp32" in name else 2
        c = spec.constexprs
        if "shrink" in name:
            expected = c["BLOCK_R"] * c["BLOCK_K"] * adapter_bytes // lanes_bytes
        elif c["R_ALIGN"] == 8:
            b_tile, partials_tile = c["BLOCK_N"] * c["BLOCK_R"] * adapter_bytes, c["SPLIT_BLOCK"] * c["BLOCK_R"] * 4
            expected = (b_tile + partials_tile) // lanes_bytes
        else:
            expected = 0
        assert counts[name] == expected, name
