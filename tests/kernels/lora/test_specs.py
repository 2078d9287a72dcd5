"""Every launch the fused launchers can make is a configuration that ``fastpeft check``
compiles for sm_80 / sm_90 (so a planner or launcher change cannot skip the check).

The launchers run on meta tensors (nothing is allocated or computed) with every kernel
replaced by a recorder (``tests/helpers/launch_recorder.py``), as on a GPU
(``interpreting()`` off, the SM count and capability of an A100 / H100). Each recorded
launch is reduced to what Triton's launcher specializes on — argument types, integers equal
to 1 (constexprs) or divisible by 16 and 16-byte aligned pointers, except the arguments the
kernel exempts (``do_not_specialize``) — plus its constexprs, warps and stages, and must
equal a spec. Problems are aligned as ``kernel_friendly`` requires (K, N multiples of 16,
contiguous operands); M and the rank are arbitrary. Launches are made with bias on (the
specs compile HAS_BIAS=True, a superset of the code without it).
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels import launch_device  # noqa: E402
from fastpeft.kernels import all_kernel_specs  # noqa: E402
from fastpeft.kernels.lora import configs as lora_configs, launch as lora_launch  # noqa: E402
from tests.helpers.launch_recorder import GPUS, launch_key, record_launches, spec_key  # noqa: E402

# (activation, LoRA weight) dtypes of the specs.
DTYPES = [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
MS = [1, 16, 17, 64, 512, 513, 1024, 4096]
NS = [64, 1024, 4096, 14336]
RANKS = [1, 8, 16, 17, 33, 64]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, object]:
    return {spec_key(s): s for s in all_kernel_specs()}


@pytest.fixture
def recorded(monkeypatch) -> list:
    launches = record_launches(monkeypatch, lora_launch)
    monkeypatch.setattr(launch_device, "interpreting", lambda: False)
    return launches


def _run(m: int, n: int, k: int, rank: int, dropout: bool, act: torch.dtype, lora: torch.dtype) -> None:
    """One forward and one full backward of the fused launchers, on meta tensors."""
    meta = torch.device("meta")
    x = torch.empty(m, k, dtype=act, device=meta)
    w = torch.empty(n, k, dtype=act, device=meta)
    bias = torch.empty(n, dtype=act, device=meta)
    a = torch.empty(rank, k, dtype=lora, device=meta)
    b = torch.empty(n, rank, dtype=lora, device=meta)
    seed = torch.empty(1 if dropout else 0, dtype=torch.int64, device=meta)
    p = 0.1 if dropout else 0.0
    _, s = lora_launch.lora_forward(x, w, bias, a, b, 0.5, p, seed)
    grad_y = torch.empty(m, n, dtype=act, device=meta)
    lora_launch.lora_backward(grad_y, x, w, a, b, s, 0.5, p, seed, True, True, True)


def _checked_specs(recorded: list, compiled: dict, capability: int, problem: str) -> list:
    """The compiled spec of every recorded launch (failing on a launch no spec compiles, or
    one checked only for the other architecture); ``problem`` names the launches' problem."""
    specs = []
    for fn, args, kwargs in recorded:
        key = launch_key(fn, args, kwargs)
        spec = compiled.get(key)
        assert spec is not None, f"{problem}: {key} is never compiled"
        assert spec.runs_on(capability), f"{spec.name} is checked only for the other architecture"
        specs.append(spec)
    return specs


def _kernel_name(spec) -> str:
    return getattr(spec.fn, "fn", spec.fn).__name__


@pytest.mark.parametrize("num_sms,capability", GPUS)
@pytest.mark.parametrize("act,lora", DTYPES, ids=str)
def test_every_launch_is_checked(compiled, recorded, monkeypatch, num_sms, capability, act, lora):
    monkeypatch.setattr(lora_configs, "device_info", lambda device: (num_sms, capability))
    kernels = set()
    for m, n, k, rank, dropout in itertools.product(MS, NS, NS, RANKS, (False, True)):
        recorded.clear()
        _run(m, n, k, rank, dropout, act, lora)
        problem = f"m={m} n={n} k={k} r={rank} dropout={dropout}"
        kernels |= {_kernel_name(spec) for spec in _checked_specs(recorded, compiled, capability, problem)}
    # Every kernel of the fused path was launched by some problem above.
    assert kernels == {
        "lora_shrink_kernel", "lora_fwd_kernel", "lora_gemm_split_kernel", "lora_fwd_split_epilogue_kernel",
        "lora_bwd_dx_kernel", "lora_bwd_dx_split_epilogue_kernel", "lora_bwd_wgrad_kernel", "sum_partials_kernel",
    }


@pytest.mark.parametrize("act,lora", DTYPES, ids=str)
def test_every_tma_launch_is_checked(compiled, recorded, monkeypatch, act, lora):
    """With the TMA forward opted in (FASTPEFT_LORA_TMA=1) on an H100, every launch is still a
    compiled spec, and the TMA kernel is among them (large M, no split-K)."""
    num_sms, capability = GPUS[1]
    monkeypatch.setattr(lora_configs, "device_info", lambda device: (num_sms, capability))
    monkeypatch.setenv(lora_configs.TMA_ENV, "1")
    kernels = set()
    for m, n, rank, dropout in itertools.product([513, 4096], NS, RANKS, (False, True)):
        recorded.clear()
        _run(m, n, 4096, rank, dropout, act, lora)
        for spec in _checked_specs(recorded, compiled, capability, f"m={m} n={n} r={rank} dropout={dropout}"):
            assert spec.expects_tma_on_sm90 == (_kernel_name(spec) == "lora_fwd_tma_kernel")
            kernels.add(_kernel_name(spec))
    assert "lora_fwd_tma_kernel" in kernels and "lora_fwd_kernel" not in kernels


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tma-asked"])
@pytest.mark.parametrize("num_sms,capability", GPUS)
@pytest.mark.parametrize("act,lora", DTYPES, ids=str)
def test_every_dora_forward_launch_is_checked(compiled, recorded, monkeypatch, num_sms, capability, act, lora, tma):
    """The forward with DoRA's epilogue (``HAS_SCALE``, as ``fastpeft.ops.dora_linear`` launches
    it; its backward is the LoRA backward's, checked above) is a compiled spec for every
    problem, on its own tiles (never the TMA forward, even when asked for)."""
    monkeypatch.setattr(lora_configs, "device_info", lambda device: (num_sms, capability))
    if tma:
        monkeypatch.setenv(lora_configs.TMA_ENV, "1")
    meta = torch.device("meta")
    kernels = set()
    for m, n, k, rank in itertools.product(MS, NS, NS, RANKS):
        recorded.clear()
        x, w = torch.empty(m, k, dtype=act, device=meta), torch.empty(n, k, dtype=act, device=meta)
        a, b = torch.empty(rank, k, dtype=lora, device=meta), torch.empty(n, rank, dtype=lora, device=meta)
        lora_launch.lora_forward(x, w, torch.empty(n, dtype=act, device=meta), a, b, 0.5, 0.0,
                                 torch.empty(0, dtype=torch.int64, device=meta),
                                 dora_scale=torch.empty(n, device=meta), u=torch.empty(m, n, dtype=act, device=meta))
        kernels |= {_kernel_name(spec) for spec in _checked_specs(recorded, compiled, capability,
                                                                  f"m={m} n={n} k={k} r={rank}")}
    assert "lora_fwd_kernel" in kernels and "lora_fwd_split_epilogue_kernel" in kernels
    assert "lora_fwd_tma_kernel" not in kernels
