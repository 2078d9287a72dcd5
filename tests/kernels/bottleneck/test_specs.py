"""Every launch the bottleneck adapter's Triton launchers can make is a configuration that
``fastpeft check`` compiles (``bottleneck_kernel_specs``), as ``tests/kernels/lora/test_specs.py``
checks for LoRA: the launchers run on meta tensors with the kernels replaced by recorders, as
on a GPU (``interpreting()`` off, an A100's / H100's SM count), and each launch, reduced to
what Triton's launcher specializes on, must equal a spec."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels import launch_device  # noqa: E402
from fastpeft.kernels.bottleneck import configs as bn_configs, launch as bn_launch  # noqa: E402
from fastpeft.kernels.bottleneck.specs import bottleneck_kernel_specs  # noqa: E402
from fastpeft.kernels.lora import launch as lora_launch  # noqa: E402
from fastpeft.kernels.lora.specs import lora_kernel_specs  # noqa: E402
from tests.helpers.launch_recorder import GPUS, launch_key, record_launches, spec_key  # noqa: E402

DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


@pytest.mark.parametrize("num_sms,capability", GPUS)
@pytest.mark.parametrize("act,weights", DTYPES, ids=str)
def test_every_launch_is_checked(monkeypatch, num_sms, capability, act, weights):
    compiled = {spec_key(s) for s in [*bottleneck_kernel_specs(), *lora_kernel_specs()]}
    launches = record_launches(monkeypatch, bn_launch, lora_launch)  # the wide weight gradients are LoRA's kernel
    for module in (bn_launch, launch_device):
        monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(bn_configs, "device_info", lambda device: (num_sms, capability))
    meta = torch.device("meta")
    kernels = set()
    for m, d, rank, dropout, biases, learned, need_h in itertools.product(
        (1, 17, 4096), (768, 4096), (1, 16, 48, 64, 128, 200, 256), (False, True), (False, True), (False, True),
        (False, True)
    ):
        h = torch.empty(m, d, dtype=act, device=meta)
        w_down = torch.empty(rank, d, dtype=weights, device=meta)
        w_up = torch.empty(d, rank, dtype=weights, device=meta)
        b_down = torch.empty(rank, dtype=weights, device=meta) if biases else None
        b_up = torch.empty(d, dtype=weights, device=meta) if biases else None
        scaling = torch.empty((), device=meta) if learned else 0.5
        seed = torch.empty(1 if dropout else 0, dtype=torch.int64, device=meta)
        p = 0.1 if dropout else 0.0
        launches.clear()
        _, z = bn_launch.bottleneck_forward(h, w_down, b_down, w_up, b_up, None, "gelu", scaling, p, seed)
        bn_launch.bottleneck_backward(torch.empty_like(h), h, w_down, w_up, b_up, z, "gelu", scaling, p, seed, True,
                                      (need_h, True, biases, True, biases, learned))
        for fn, args, kwargs in launches:
            key = launch_key(fn, args, kwargs)
            assert key in compiled, f"m={m} d={d} r={rank} dropout={dropout}: {key} is never compiled"
            kernels.add(key[0])
    assert kernels == {"bottleneck_down_kernel", "bottleneck_down_sum_kernel", "bottleneck_up_kernel",
                       "bottleneck_bwd_dz_kernel", "bottleneck_bwd_dz_sum_kernel", "bottleneck_bwd_wgrad_dh_kernel",
                       "bottleneck_bwd_dh_kernel", "lora_bwd_wgrad_kernel", "sum_partials_kernel"}
