"""The multi-LoRA torch path's static formulations (``multi_lora_add_torch`` and
``multi_lora_backward_torch`` with ``how="slots"`` or ``"tokens"``: what CUDA tensors take)
run on CPU tensors under
``tests.helpers.host_sync.no_host_sync``, which fails on any host read (ATen's
``_local_scalar_dense``, ``nonzero``, ``unique``..., and Python's ``item`` / ``tolist`` /
``bool`` / ``int``...) and any data-dependent shape:

- forward (all slots at once, and per token, in chunks) and backward against the float64
  per-token reference, with the CUDA semantics the op's CPU checks never let through: ids
  outside ``[0, L)`` (no adapter) and ranks outside ``[0, R_MAX]`` (clamped); NaN padding
  past each rank, so a read of it shows;
- the same ops on the same shapes whatever the ids and ranks hold, and a run on fake
  tensors (which refuse data-dependent shapes);
- the double backward (gradgradcheck) through the static backward;
- the guard can fail: each kind of sync injected into the path raises under it (and runs
  without it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fastpeft.ops import multi_lora_linear_ref
from fastpeft.ops import multi_lora_linear_torch as torch_path
from tests.helpers.host_sync import HostSyncError, no_host_sync
from tests.helpers.multi_lora_decode import padded_slots
from tests.helpers.numerics import assert_close

K, N, R_MAX = 37, 45, 40
# Slot 1 at R_MAX, slot 4 empty, slot 5 above R_MAX (clamped), slot 6 negative (rank 0).
RANKS = [3, 40, 1, 17, 0, 99, -4]
# Ids outside [0, L): no adapter on a GPU (the op raises for them on CPU tensors).
INVALID_IDS = [-1, -5, len(RANKS), 2**40]


def _problem(num_tokens: int, dtype: torch.dtype, lora_dtype: torch.dtype, seed: int, ranks=RANKS) -> dict:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.tensor(ranks)
    num_slots = ranks.shape[0]
    lora_a, lora_b = padded_slots(num_slots, R_MAX, K, N, ranks, lora_dtype, g)
    ids = torch.randint(-1, num_slots, (num_tokens,), generator=g)
    invalid = torch.tensor(INVALID_IDS)
    ids[::7] = invalid[torch.arange(0, num_tokens, 7) % len(INVALID_IDS)]
    x, weight = torch.randn(num_tokens, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    return dict(x=x.to(dtype), weight=weight.to(dtype), lora_a=lora_a, lora_b=lora_b, scalings=torch.rand(num_slots, generator=g) + 0.5, adapter_ids=ids,
                ranks=ranks, grad_y=torch.randn(num_tokens, N, generator=g).to(dtype))


def _expected(p: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """float64 ``y`` and the gradients of ``(y * grad_y).sum()`` in x, lora_a, lora_b, per
    token (``multi_lora_linear_ref``) with the GPU's semantics: invalid ids mean -1, ranks
    clamped to ``[0, R_MAX]``."""
    num_slots = p["lora_a"].shape[0]
    ids = p["adapter_ids"]
    ids = torch.where((ids >= 0) & (ids < num_slots), ids, -1)
    leaves = [p[k].double().nan_to_num(0.0).requires_grad_() for k in ("x", "lora_a", "lora_b")]
    y = multi_lora_linear_ref(leaves[0], p["weight"].double(), None, leaves[1], leaves[2], p["scalings"].double(), ids,
                              p["ranks"].clamp(0, R_MAX))
    grads = torch.autograd.grad(y, leaves, p["grad_y"].double())
    return y.detach(), dict(zip(("x", "lora_a", "lora_b"), grads))


def _static_args(p: dict) -> tuple:
    """``(lora_a, lora_b, scalings, adapter_ids, ranks)`` as the op passes them (scalings in
    fp32, or float64 for float64 adapters)."""
    scalings = p["scalings"].to(torch.promote_types(p["lora_a"].dtype, torch.float32))
    return p["lora_a"], p["lora_b"], scalings, p["adapter_ids"], p["ranks"]


def _run_static(p: dict, how: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, dX, dA, dB)`` from the static forward (``how``; None: the pick for CUDA tensors)
    and backward, as the op calls them (y and dX start from the base products), each call
    under ``no_host_sync``."""
    how = how or torch_path.formulation(torch.device("cuda"), p["x"].shape[0], p["lora_a"].shape[0])
    assert how != "grouped"
    y = F.linear(p["x"], p["weight"])
    dx = p["grad_y"] @ p["weight"]
    with no_host_sync():
        torch_path.multi_lora_add_torch(y, p["x"], *_static_args(p), how=how)
    with no_host_sync():
        da, db = torch_path.multi_lora_backward_torch(p["grad_y"], p["x"], dx, *_static_args(p), True, True, how=how)
    return y, dx, da, db


def _assert_slot_grads(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Each slot's used block within tolerance; past its clamped rank exactly zero."""
    if what == "dB":  # [L, N, R_MAX]: the ranks last
        actual, expected = actual.transpose(1, 2), expected.transpose(1, 2)
    for i, rank in enumerate(torch.tensor(RANKS).clamp(0, R_MAX).tolist()):
        if rank:
            assert_close(actual[i, :rank], expected[i, :rank], dtype, f"{what}[{i}]")
        pad = actual[i, rank:]
        assert torch.equal(pad, torch.zeros_like(pad)), f"{what}[{i}]: not zero past rank {rank}"


# (tokens, formulation, activation dtype, adapter dtype): all slots, per token (forced, and
# picked for T < L), float64, fp16 with PEFT's fp32 adapters.
CASES = [
    (67, "slots", torch.float32, torch.float32),
    (67, "tokens", torch.float32, torch.float32),
    (5, None, torch.float32, torch.float32),
    (30, "slots", torch.float64, torch.float64),
    (30, "tokens", torch.float16, torch.float32),
    (30, "slots", torch.float16, torch.float16),
]


@pytest.mark.parametrize("num_tokens,how,dtype,lora_dtype", CASES)
def test_static_path_matches_reference_without_host_sync(monkeypatch, num_tokens, how, dtype, lora_dtype):
    monkeypatch.setattr(torch_path, "_GATHER_CHUNK", 16)  # several chunks of the per-token formulation
    p = _problem(num_tokens, dtype, lora_dtype, seed=num_tokens)
    y, dx, da, db = _run_static(p, how)
    expected, grads = _expected(p)
    assert_close(y, expected, dtype, "y")
    assert_close(dx, grads["x"], dtype, "dX")
    _assert_slot_grads(da, grads["lora_a"], lora_dtype, "dA")
    _assert_slot_grads(db, grads["lora_b"], lora_dtype, "dB")


@pytest.mark.parametrize("how", ["slots", "tokens"])
def test_same_ops_on_same_shapes_whatever_the_values(how):
    """Ids all absent, all one slot, or mixed; ranks all zero or mixed: one op sequence on
    one set of shapes (nothing is sized by the data)."""
    traces = []
    for seed, ids, ranks in ((1, None, RANKS), (2, -1, RANKS), (3, 1, [0] * len(RANKS)), (4, 3, [40] * len(RANKS))):
        p = _problem(12, torch.float32, torch.float32, seed=seed, ranks=ranks)
        if ids is not None:
            p["adapter_ids"].fill_(ids)
        y, dx = F.linear(p["x"], p["weight"]), p["grad_y"] @ p["weight"]
        with no_host_sync() as guard:
            torch_path.multi_lora_add_torch(y, p["x"], *_static_args(p), how=how)
            torch_path.multi_lora_backward_torch(p["grad_y"], p["x"], dx, *_static_args(p), True, True, how=how)
        traces.append(guard.trace)
    assert all(trace == traces[0] for trace in traces)


def test_static_path_runs_on_fake_tensors():
    """Fake tensors carry no values: an op whose output shape depends on them, or a read of
    one, raises there."""
    p = _problem(12, torch.float32, torch.float32, seed=5)
    with FakeTensorMode() as mode:
        f = {k: mode.from_tensor(v) for k, v in p.items()}
        y, dx = F.linear(f["x"], f["weight"]), f["grad_y"] @ f["weight"]
        for how in ("slots", "tokens"):
            torch_path.multi_lora_add_torch(y, f["x"], *_static_args(f), how=how)
        da, db = torch_path.multi_lora_backward_torch(f["grad_y"], f["x"], dx, *_static_args(f), True, True, how="slots")
    assert (tuple(da.shape), tuple(db.shape)) == (tuple(p["lora_a"].shape), tuple(p["lora_b"].shape))


def test_static_backward_is_differentiable(monkeypatch):
    """gradcheck and gradgradcheck of the op with every device taking the static path (the
    double backward differentiates the static backward)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    monkeypatch.setattr(torch_path, "host_groups_allowed", lambda device: False)
    from fastpeft.ops import multi_lora_linear

    g = torch.Generator().manual_seed(6)
    x, w, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64)
                  for shape in ((5, 5), (6, 5), (3, 3, 5), (3, 6, 3)))
    ids, ranks = torch.tensor([1, -1, 0, 1, 2]), torch.tensor([2, 3, 1])
    scalings = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, a, b)]
    fn = lambda x, a, b: multi_lora_linear(x, w, None, a, b, scalings, ids, ranks)  # noqa: E731
    torch.autograd.gradcheck(fn, leaves)
    torch.autograd.gradgradcheck(fn, leaves)


def _inject(kind: str, ranks: torch.Tensor) -> None:
    """One host sync of ``kind`` on ``ranks`` (what a careless edit of the path could add)."""
    if kind == "tolist":
        ranks.tolist()
    elif kind == "item":
        ranks[0].item()
    elif kind == "bool":
        bool((ranks > 0).any())
    elif kind == "int":
        int(ranks.max())
    elif kind == "nonzero":
        torch.nonzero(ranks)
    elif kind == "mask_index":
        ranks[ranks > 0]
    elif kind == "repeat_interleave":
        torch.repeat_interleave(ranks.clamp(min=0))
    elif kind == "unique":
        torch.unique(ranks)


INJECTED = ["tolist", "item", "bool", "int", "nonzero", "mask_index", "repeat_interleave", "unique"]


@pytest.mark.parametrize("kind", INJECTED)
@pytest.mark.parametrize("entry", ["slots", "tokens", "backward"])
def test_guard_fails_on_an_injected_sync(monkeypatch, kind, entry):
    """The guard is not a test that cannot fail: a sync added to the path (here in
    ``_rank_mask``, which every static entry point calls) raises under it, and the same
    code runs without it."""
    rank_mask = torch_path._rank_mask

    def syncing_rank_mask(ranks, r_max):
        _inject(kind, ranks)
        return rank_mask(ranks, r_max)

    monkeypatch.setattr(torch_path, "_rank_mask", syncing_rank_mask)
    p = _problem(9, torch.float32, torch.float32, seed=7)
    y, dx = F.linear(p["x"], p["weight"]), p["grad_y"] @ p["weight"]

    def run():
        if entry == "backward":
            torch_path.multi_lora_backward_torch(p["grad_y"], p["x"], dx, *_static_args(p), True, True, how="slots")
        else:
            torch_path.multi_lora_add_torch(y, p["x"], *_static_args(p), how=entry)

    run()  # the injected code itself works
    with pytest.raises(HostSyncError):
        with no_host_sync():
            run()
    # The guard restored what it replaced.
    assert p["ranks"].tolist() == RANKS and bool(p["ranks"].any())
