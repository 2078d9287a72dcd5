"""Which dropout mask the ops' torch paths draw (``fastpeft.ops.dropout``): the kernels'
Philox bits wherever the kernels are in use (redrawn by the backward, so the forward keeps
no mask), torch's CPU generator seeded with the op's seed on CPU, and on CUDA without the
kernels torch's CUDA generator, as ``nn.Dropout`` draws it (kept by the forward). The CUDA
branch runs here on fake CUDA tensors (``FakeTensorMode``): shapes, dtypes and the ops it
dispatches, no data."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastpeft.backend import triton_available
from fastpeft.kernels.dropout_mask import keep_mask_cpu, keep_mask_philox
from fastpeft.ops import bottleneck_adapter_dropout_mask, lora_linear_dropout_mask
from fastpeft.ops.dropout import keep_mask_torch_path, mask_follows_seed, rebuilt_keep_mask, redraws_mask
from tests.helpers.bottleneck_problem import check_against_reference as check_bottleneck
from tests.helpers.bottleneck_problem import make_problem as bottleneck_problem
from tests.helpers.devices import KERNELS_RUN
from tests.helpers.lora_problem import check_against_reference, make_problem

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


class RecordedOps(TorchDispatchMode):
    """The aten ops dispatched in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_on_cuda_without_the_kernels_the_mask_comes_from_torchs_generator(monkeypatch):
    """``auto`` before the kernels are validated on a GPU (and ``torch``): one Bernoulli draw
    into a bool mask -- no Philox in int64 torch ops, no host sync -- kept by the forward."""
    for choice in ("auto", "torch"):
        monkeypatch.setenv("FASTPEFT_BACKEND", choice)
        assert not mask_follows_seed(CUDA) and not redraws_mask(CUDA)
        with FakeTensorMode():
            seed = torch.zeros(1, dtype=torch.int64, device=CUDA)
            with RecordedOps() as recorded:
                keep = keep_mask_torch_path(seed, 4096, 4096, 0.1)
            assert (keep.shape, keep.dtype, keep.device.type) == ((4096, 4096), torch.bool, "cuda")
            assert recorded.ops == ["aten.empty", "aten.bernoulli_"]
            with pytest.raises(ValueError, match="CUDA generator"):
                rebuilt_keep_mask(seed, 8, 8, 0.1, kernel_path=False)
            with pytest.raises(ValueError, match="CUDA generator"):
                lora_linear_dropout_mask(seed, 8, 8, 0.1)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_on_cuda_with_the_kernels_the_mask_follows_the_seed_and_is_redrawn(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    assert mask_follows_seed(CUDA) and redraws_mask(CUDA)


def test_on_cpu_the_mask_follows_the_seed(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    seed = torch.tensor([12345])
    assert mask_follows_seed(CPU) and not redraws_mask(CPU)
    assert torch.equal(keep_mask_torch_path(seed, 9, 13, 0.3), keep_mask_cpu(seed, 9, 13, 0.3))
    assert torch.equal(bottleneck_adapter_dropout_mask(seed, 9, 13, 0.3), keep_mask_cpu(seed, 9, 13, 0.3))


@pytest.mark.skipif(not KERNELS_RUN, reason="needs the kernels (Triton's interpreter)")
def test_where_the_kernels_run_the_torch_path_draws_their_bits_and_keeps_no_mask(monkeypatch):
    """A float64 problem takes the torch path even under ``FASTPEFT_BACKEND=triton``: its mask
    is the kernels' Philox mask, the forward keeps none (the backward redraws it), and the
    gradients still match float64 PEFT math with that mask."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    seed = torch.tensor([987654321])
    assert torch.equal(keep_mask_torch_path(seed, 9, 13, 0.3), keep_mask_philox(seed, 9, 13, 0.3))
    pb = make_problem((3, 7), 40, 24, 4, torch.float64)
    _, _, keep = torch.ops.fastpeft.lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, 2.0, 0.3, seed)
    assert keep.numel() == 0
    check_against_reference(pb, 0.3)
    bn = bottleneck_problem((3, 7), 40, 8, torch.float64)
    _, _, keep = torch.ops.fastpeft.bottleneck_adapter(bn.h, bn.w_down, bn.b_down, bn.w_up, bn.b_up, None, "silu",
                                                       0.5, None, 0.3, seed, "triton", True)
    assert keep.numel() == 0
    check_bottleneck(bn, "silu", 0.3)


def test_the_ops_keep_output_says_which_mask_the_call_drew(monkeypatch):
    """With the op's ``keep`` output the rebuilt mask is the call's whichever path ran it: the
    torch path's kept mask, else (nothing kept) the kernels' Philox mask; on CUDA under
    ``auto``, where a tuned table may have sent the call to a kernel, it answers instead of
    raising."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    seed = torch.tensor([4242])
    pb = make_problem((9,), 13, 6, 2, torch.float32)
    _, _, keep = torch.ops.fastpeft.lora_linear(pb.x, pb.weight, pb.bias, pb.lora_a, pb.lora_b, 2.0, 0.3, seed, True)
    assert torch.equal(lora_linear_dropout_mask(seed, 9, 13, 0.3, keep=keep), keep_mask_cpu(seed, 9, 13, 0.3))
    nothing_kept = torch.empty(0, dtype=torch.bool)
    for rebuild in (lora_linear_dropout_mask, bottleneck_adapter_dropout_mask):
        assert torch.equal(rebuild(seed, 9, 13, 0.3, keep=keep), keep.reshape(9, 13))
        assert torch.equal(rebuild(seed, 9, 13, 0.3, keep=nothing_kept), keep_mask_philox(seed, 9, 13, 0.3))
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    with FakeTensorMode():
        seed = torch.zeros(1, dtype=torch.int64, device=CUDA)
        kept = torch.empty(64, dtype=torch.bool, device=CUDA)
        assert lora_linear_dropout_mask(seed, 8, 8, 0.1, keep=kept).shape == (8, 8)
        assert bottleneck_adapter_dropout_mask(seed, 8, 8, 0.1, keep=kept).shape == (8, 8)
