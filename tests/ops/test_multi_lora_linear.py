"""``fastpeft.ops.multi_lora_linear`` against the per-token float64 reference
(``multi_lora_linear_ref``), on the Triton kernels (interpreted on CPU) and the torch path:
random ids with -1, repeated and interleaved, heterogeneous ranks (padding filled with NaN,
so a kernel that reads it fails), T in {1, 5, 67} (decode kernels up to 32 tokens, sorted
segments above), odd K and N, forward and every slot's gradient. Kernel outputs are poisoned
with NaN (conftest)."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastpeft.kernels.multi_lora import configs
from fastpeft.ops import multi_lora_linear, multi_lora_linear_ref
from fastpeft.ops import multi_lora_linear_torch
from tests.helpers.devices import DEVICE, KERNELS_RUN
from tests.helpers.host_sync import no_host_sync
from tests.helpers.numerics import assert_close

K, N = 37, 45  # odd: no tile divides them
RANKS = [3, 40, 1, 17, 0]  # slot 4 empty; R_MAX = 40 spans several rank blocks


def _problem(num_tokens: int, dtype: torch.dtype, lora_dtype: torch.dtype | None = None, ranks=RANKS, bias=True,
             seed: int = 0, num_slots: int | None = None, k: int = K, n: int = N):
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    num_slots = num_slots or len(ranks)
    r_max = max(ranks)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(DEVICE)

    lora_a, lora_b = rand(num_slots, r_max, k, dt=lora_dtype), rand(num_slots, n, r_max, dt=lora_dtype)
    for i, r in enumerate(ranks):  # the padding past each rank is never to be read
        lora_a[i, r:] = float("nan")
        lora_b[i, :, r:] = float("nan")
    # Ids: every slot and -1, repeated and interleaved.
    ids = torch.randint(-1, num_slots, (num_tokens,), generator=g).to(DEVICE)
    return dict(
        x=rand(num_tokens, k), weight=rand(n, k) / k**0.5, bias=rand(n) if bias else None,
        lora_a=lora_a / k**0.5, lora_b=lora_b, scalings=(torch.rand(num_slots, generator=g) + 0.5).to(DEVICE),
        adapter_ids=ids, ranks=torch.tensor(ranks, device=DEVICE),
    )


def _reference(p: dict, grad: torch.Tensor | None = None):
    """Forward in float64 per token, and the gradients of ``(y * grad).sum()``."""
    leaves = {k: p[k].double().nan_to_num(0.0).requires_grad_() for k in ("x", "lora_a", "lora_b")}
    y = multi_lora_linear_ref(leaves["x"], p["weight"].double(), None if p["bias"] is None else p["bias"].double(),
                              leaves["lora_a"], leaves["lora_b"], p["scalings"].double(), p["adapter_ids"], p["ranks"])
    if grad is None:
        return y.detach(), None
    y.backward(grad.double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _slot_grad_close(actual, expected, ranks, dtype, what):
    """Each slot's used block within tolerance; the padding (and empty slots) exactly zero."""
    for i, r in enumerate(ranks):
        used = (slice(i, i + 1), slice(0, r)) if what == "lora_a" else (slice(i, i + 1), slice(None), slice(0, r))
        if r:
            assert_close(actual[used], expected[used], dtype, f"{what}[{i}]")
        pad = actual[i, r:] if what == "lora_a" else actual[i, :, r:]
        assert torch.equal(pad, torch.zeros_like(pad)), f"{what}[{i}] padding past rank {r} is not zero"


# (T, dtype, LoRA dtype): decode sizes and a segments size; fp16, fp32, fp32 adapters on fp16.
# On the torch path 1 and 5 tokens are grouped on the host, 67 (above
# HOST_GROUPING_MAX_TOKENS) by the sort.
CASES = [(1, torch.float32, None), (5, torch.float16, torch.float32), (67, torch.float32, None),
         (67, torch.float16, None)]


@pytest.mark.parametrize("num_tokens,dtype,lora_dtype", CASES)
def test_forward_and_backward_match_per_token_reference(backend, num_tokens, dtype, lora_dtype):
    p = _problem(num_tokens, dtype, lora_dtype, seed=num_tokens)
    grad = torch.randn(num_tokens, N, generator=torch.Generator().manual_seed(9)).to(dtype).to(DEVICE)
    expected, grads = _reference(p, grad)
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
    y = multi_lora_linear(**{**p, **leaves})
    assert y.dtype == dtype
    assert_close(y, expected, dtype, "y")
    y.backward(grad)
    assert_close(leaves["x"].grad, grads["x"], dtype, "dX")
    for what in ("lora_a", "lora_b"):
        _slot_grad_close(leaves[what].grad, grads[what], RANKS, lora_dtype or dtype, what)


def test_bfloat16_torch_path(monkeypatch):
    """bf16 (wrong in Triton's interpreter) on the torch path, with PEFT's fp32 adapters."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    p = _problem(67, torch.bfloat16, torch.float32, seed=3)
    assert_close(multi_lora_linear(**p), _reference(p)[0], torch.bfloat16, "y")


@pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels do not run here")
def test_large_segment_tiles_and_wide_ranks(monkeypatch):
    """The 64-row segment tiles (prefill) and ranks past one 64-wide rank block (up to 130),
    forward and backward, on the kernels."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setattr(configs, "SEGMENT_LARGE_T", 40)
    ranks = [130, 2, 65]
    p = _problem(67, torch.float32, ranks=ranks, seed=4)
    grad = torch.randn(67, N, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    expected, grads = _reference(p, grad)
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
    y = multi_lora_linear(**{**p, **leaves})
    assert_close(y, expected, torch.float32, "y")
    y.backward(grad)
    assert_close(leaves["x"].grad, grads["x"], torch.float32, "dX")
    for what in ("lora_a", "lora_b"):
        _slot_grad_close(leaves[what].grad, grads[what], ranks, torch.float32, what)


@pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels do not run here")
def test_backward_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    p = _problem(67, torch.float32, seed=6)
    grads = []
    for _ in range(2):
        leaves = {k: p[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
        multi_lora_linear(**{**p, **leaves}).sum().backward()
        grads.append([leaves[k].grad for k in ("x", "lora_a", "lora_b")])
    for a, b in zip(*grads):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_three_d_input_and_non_contiguous_views(backend):
    p = _problem(10, torch.float32, seed=7)
    x3 = torch.randn(5, 2 * K, generator=torch.Generator().manual_seed(8)).to(DEVICE)[:, ::2].reshape(5, 1, K)
    x3 = x3.expand(5, 2, K)  # stride 0 in the middle, odd column stride
    ids = p["adapter_ids"].reshape(5, 2)
    y = multi_lora_linear(**{**p, "x": x3, "adapter_ids": ids})
    expected = _reference({**p, "x": x3.reshape(10, K), "adapter_ids": ids.reshape(-1)})[0]
    assert_close(y, expected.reshape(5, 2, N), torch.float32, "y (3-D)")


def test_no_tokens(backend):
    p = _problem(0, torch.float32)
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
    y = multi_lora_linear(**{**p, **leaves})
    assert y.shape == (0, N)
    y.sum().backward()
    assert leaves["x"].grad.shape == (0, K)
    assert torch.equal(leaves["lora_a"].grad, torch.zeros_like(p["lora_a"]))
    assert torch.equal(leaves["lora_b"].grad, torch.zeros_like(p["lora_b"]))


@pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels do not run here")
@pytest.mark.parametrize("path", ["decode", "segments"])
def test_kernels_never_read_out_of_bounds(path):
    """Ids outside [0, L) (the op raises for them on CPU; on a GPU they reach the kernels)
    mean "no adapter": the row keeps its base output and no slot is read for it. The slots
    are views into storage poisoned with NaN around them, so a read outside them shows."""
    from fastpeft.kernels.multi_lora import launch

    p = _problem(9, torch.float32, seed=10)
    num_slots, r_max, _ = p["lora_a"].shape
    storage_a = torch.full((num_slots + 4, r_max, K), float("nan"), device=DEVICE)
    storage_b = torch.full((num_slots + 4, N, r_max), float("nan"), device=DEVICE)
    storage_a[2:2 + num_slots] = p["lora_a"]
    storage_b[2:2 + num_slots] = p["lora_b"]
    ids = torch.tensor([-5, num_slots, 2, -1, num_slots + 1, 1, -2, 3, 2**40], device=DEVICE)
    ranks = torch.tensor([3, 99, -4, 17, 0], device=DEVICE)  # clamped to [0, R_MAX]
    y = p["x"] @ p["weight"].t()
    base = y.clone()
    add = launch.multi_lora_decode if path == "decode" else launch.multi_lora_segments_add
    add(y, p["x"], storage_a[2:2 + num_slots], storage_b[2:2 + num_slots], p["scalings"], ids, ranks)
    invalid = (ids < 0) | (ids >= num_slots)
    assert torch.equal(y[invalid], base[invalid])
    clean = {**p, "adapter_ids": torch.where(invalid, -1, ids), "ranks": ranks.clamp(0, r_max), "bias": None}
    clean["lora_a"] = p["lora_a"].nan_to_num(0.0)  # rank 99 clamps to R_MAX = 40: slot 1 read whole
    clean["lora_b"] = p["lora_b"].nan_to_num(0.0)
    assert_close(y, _reference(clean)[0], torch.float32, "y")


@pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels do not run here")
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, None), (torch.float16, torch.float32)])
@pytest.mark.parametrize("num_tokens,ranks,splits", [(1, RANKS, 5), (3, RANKS, 4), (3, [3, 21, 1, 17, 0], 5)])
def test_decode_split_k_matches_reference(monkeypatch, num_tokens, ranks, splits, dtype, lora_dtype):
    """The decode shrink split over K and the expand's narrow column blocks (issue 19), with 64
    simulated SMs: K = 300 is five 64-column steps (the last one partial); T = 3, R_MAX = 40
    (10 rank blocks of 4) takes 4 splits of 1, 1, 1 and 2 steps; T = 1 takes 5 of one step each.
    The expand (N = 45, too few columns for 64 programs) takes 16-column blocks, of whole
    16-rank blocks and a masked last one (ranks 17 and 40), loaded as vectors (R_MAX = 40:
    R_ALIGN 8) or one element at a time (R_MAX = 21: R_ALIGN 1). T = 1 runs once per id: -1,
    each slot (ranks 3, 40, 1, 17) and the rank-0 slot (no change). Against the float64
    reference, with the scratch partials NaN-poisoned (conftest), and bitwise the same on a
    second run."""
    from fastpeft.kernels.lora import configs as lora_configs
    from fastpeft.kernels.multi_lora import launch

    monkeypatch.setattr(lora_configs, "device_info", lambda device: (64, 90))
    k = 300
    p = _problem(num_tokens, dtype, lora_dtype, ranks=ranks, seed=11, k=k)
    num_slots, r_max, _ = p["lora_a"].shape
    assert configs.decode_shrink_splits(num_tokens, r_max, k, p["x"].device) == splits
    assert configs.decode_rank_align(r_max) == (8 if r_max == 40 else 1)
    assert configs.decode_expand_tile(num_tokens, N, p["x"].device).block_n == 16
    if num_tokens == 1:
        id_cases = [torch.tensor([i], device=DEVICE) for i in range(-1, num_slots)]
    else:  # whole rank blocks and a last one of 8 or 5 ranks (slot 1), 1 rank (slot 3), none
        id_cases = [torch.tensor([1, 3, -1], device=DEVICE)]
    base = p["x"] @ p["weight"].t()
    for ids in id_cases:
        y = _added_twice(launch.multi_lora_decode, {**p, "adapter_ids": ids}, base, dtype)
        if ids.tolist() in ([-1], [num_slots - 1]):  # no adapter, or the rank-0 slot: y untouched
            assert torch.equal(y, base), ids


@pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels do not run here")
@pytest.mark.parametrize("num_sms,block_n", [(2, 128), (4, 64), (7, 32), (13, 16)])
def test_decode_expand_column_blocks(monkeypatch, num_sms, block_n):
    """Each column block the decode expand can take (N = 200: 2, 4, 7 or 13 blocks, the widest
    that gives one program per simulated SM), on one token of each slot and none."""
    from fastpeft.kernels.lora import configs as lora_configs
    from fastpeft.kernels.multi_lora import launch

    monkeypatch.setattr(lora_configs, "device_info", lambda device: (num_sms, 90))
    n = 200
    p = _problem(len(RANKS) + 1, torch.float32, seed=16, n=n)
    p["adapter_ids"] = torch.arange(-1, len(RANKS), device=DEVICE)
    assert configs.decode_expand_tile(1, n, p["x"].device).block_n == block_n
    for t in range(len(RANKS) + 1):
        one = {**p, "x": p["x"][t:t + 1], "adapter_ids": p["adapter_ids"][t:t + 1]}
        _added_twice(launch.multi_lora_decode, one, one["x"] @ p["weight"].t(), torch.float32)


def _added_twice(add, p: dict, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``add`` (a launcher of ``multi_lora.launch``) run twice on copies of ``base``: bitwise
    the same both times and equal to the float64 reference; returns the result."""
    runs = []
    for _ in range(2):
        y = base.clone()
        add(y, p["x"], p["lora_a"], p["lora_b"], p["scalings"], p["adapter_ids"], p["ranks"])
        runs.append(y)
    ids = p["adapter_ids"].tolist()
    assert torch.equal(runs[0], runs[1]), ids
    assert_close(runs[0], _reference({**p, "bias": None})[0], dtype, f"y (ids {ids})")
    return runs[0]


@pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels do not run here")
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, None), (torch.float16, torch.float32)])
def test_segment_split_k_matches_reference(monkeypatch, dtype, lora_dtype):
    """The segment shrink split over K (issue 19), with 24 simulated SMs: T = 40 tokens in
    16-row tiles (8 tiles in the static list, one rank block at R_MAX = 40) over K = 300 (five
    64-column steps, the last partial) take 3 splits of 1, 2 and 2 steps, which the expand
    adds in a fixed order: equal to the float64 reference with the partials NaN-poisoned
    (conftest), bitwise the same on a second run. The op's backward (one split: dA reads dS
    itself) matches too."""
    from fastpeft.kernels.lora import configs as lora_configs
    from fastpeft.kernels.multi_lora import launch

    monkeypatch.setattr(lora_configs, "device_info", lambda device: (24, 90))
    k, num_tokens = 300, 40
    p = _problem(num_tokens, dtype, lora_dtype, seed=14, k=k)
    r_max = p["lora_a"].shape[1]
    assert configs.segment_shrink_splits(8, num_tokens, r_max, k, p["x"].device) == 3
    _added_twice(launch.multi_lora_segments_add, p, p["x"] @ p["weight"].t(), dtype)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    grad = torch.randn(num_tokens, N, generator=torch.Generator().manual_seed(15)).to(dtype).to(DEVICE)
    expected, grads = _reference(p, grad)
    leaves = {name: p[name].clone().requires_grad_() for name in ("x", "lora_a", "lora_b")}
    y = multi_lora_linear(**{**p, **leaves})
    y.backward(grad)
    assert_close(y, expected, dtype, "y")
    assert_close(leaves["x"].grad, grads["x"], dtype, "dX")
    for what in ("lora_a", "lora_b"):
        _slot_grad_close(leaves[what].grad, grads[what], RANKS, dtype, what)


@pytest.mark.parametrize("num_tokens,ranks", [(67, RANKS), (21, RANKS * 5)])  # all slots; per token (T < L)
def test_torch_path_without_host_sync(monkeypatch, num_tokens, ranks):
    """The op on the torch path as CUDA tensors take it (the static formulations, and no
    CPU-only argument check), forward and backward under ``no_host_sync``: a host read (ATen's
    ``_local_scalar_dense``, ``nonzero``..., or Python's ``item`` / ``tolist`` / ``bool`` /
    ``int``) or a data-dependent shape raises; the result against the reference."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    monkeypatch.setattr(multi_lora_linear_torch, "host_groups_allowed", lambda device: False)
    # On CUDA tensors the op's value check returns at once; on CPU ones it reads them.
    monkeypatch.setattr(importlib.import_module("fastpeft.ops.multi_lora_linear"), "_check_host_values",
                        lambda *args: None)
    monkeypatch.setattr(multi_lora_linear_torch, "_GATHER_CHUNK", 16)  # 2 chunks of the per-token formulation
    p = _problem(num_tokens, torch.float32, ranks=ranks, seed=11)
    grad = torch.randn(num_tokens, N, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    expected, grads = _reference(p, grad)
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
    with no_host_sync():
        y = multi_lora_linear(**{**p, **leaves})
        y.backward(grad)
    assert_close(y, expected, torch.float32, "y")
    assert_close(leaves["x"].grad, grads["x"], torch.float32, "dX")
    for what in ("lora_a", "lora_b"):
        _slot_grad_close(leaves[what].grad, grads[what], ranks, torch.float32, what)


def test_torch_path_skewed_groups(monkeypatch):
    """A popular adapter beside small groups, in float64 (the grouped torch path)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    p = _problem(67, torch.float64, seed=12)
    p["adapter_ids"][:50] = 1
    assert_close(multi_lora_linear(**p), _reference(p)[0], torch.float64, "y")


def test_bad_arguments_raise_clear_errors():
    p = _problem(5, torch.float32, seed=13)
    cases = [
        ({"adapter_ids": torch.tensor([0, 1, 5, 0, -1])}, ValueError, r"adapter_ids\[2\] = 5 is outside \[-1, 5\)"),
        ({"adapter_ids": torch.tensor([0, -2, 1, 0, -1])}, ValueError, r"adapter_ids\[1\] = -2"),
        ({"adapter_ids": torch.zeros(4, dtype=torch.int64)}, ValueError, "adapter_ids .* must have shape"),
        ({"adapter_ids": torch.zeros(5)}, TypeError, "adapter_ids .* integer dtype"),
        ({"ranks": torch.tensor([1, 2, 41, 0, 0])}, ValueError, r"ranks .* \[0, 40\]"),
        ({"scalings": torch.ones(4)}, ValueError, "scalings .* one per adapter slot"),
        ({"lora_b": torch.zeros(5, N, 39)}, ValueError, "lora_b .* must have shape"),
        ({"lora_a": torch.zeros(5, 40, K + 1)}, ValueError, "lora_a"),
        ({"lora_b": p["lora_b"].double()}, TypeError, "lora_b dtype"),
        ({"weight": p["weight"].half()}, TypeError, "weight dtype"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            multi_lora_linear(**{**p, **change})


def test_opcheck_and_compile(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    p = _problem(7, torch.float64, ranks=[2, 3, 1], seed=14)
    p = {k: v.nan_to_num(0.0) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in p.items()}
    args = [p[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scalings", "adapter_ids", "ranks")]
    for i in (0, 3, 4):
        args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_linear.default, tuple(args))
    # gradcheck (and gradgradcheck: the backward is differentiable) on a tiny problem.
    g = torch.Generator().manual_seed(15)
    x, w, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((4, 5), (6, 5), (2, 2, 5), (2, 6, 2)))
    ids, ranks, scalings = torch.tensor([1, -1, 0, 1]), torch.tensor([2, 1]), torch.tensor([0.5, 2.0], dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, a, b)]
    fn = lambda x, a, b: multi_lora_linear(x, w, None, a, b, scalings, ids, ranks)  # noqa: E731
    torch.autograd.gradcheck(fn, leaves)
    torch.autograd.gradgradcheck(fn, leaves)
    compiled = torch.compile(lambda *a: multi_lora_linear(*a), fullgraph=True, backend="aot_eager")

    def fresh_leaves() -> list:
        return [t.detach().clone().requires_grad_() if i in (0, 3, 4) else t for i, t in enumerate(args)]

    ours, eager = fresh_leaves(), fresh_leaves()
    y = compiled(*ours)
    torch.testing.assert_close(y, _reference(p)[0])
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    multi_lora_linear(*eager).backward(grad_y)
    for i, name in ((0, "dx"), (3, "dA"), (4, "dB")):  # the compiled backward computes the eager one's values
        torch.testing.assert_close(ours[i].grad, eager[i].grad, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens", [8, 40])  # decode kernels, sorted segments
def test_cuda_graph_step_replays_with_other_adapters(monkeypatch, backend_name, num_tokens):
    """A step captured once and replayed with another adapter mix (and another slot content)
    gives the eager result: nothing was read on the host."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend_name)
    p = _problem(num_tokens, torch.float16, seed=15, k=64, n=96)
    p["lora_a"], p["lora_b"] = p["lora_a"].nan_to_num(0.0), p["lora_b"].nan_to_num(0.0)
    multi_lora_linear(**p)  # warm up (compiles the kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = multi_lora_linear(**p)
    for seed in (16, 17):
        new = _problem(num_tokens, torch.float16, seed=seed, k=64, n=96)
        p["adapter_ids"].copy_(new["adapter_ids"])
        p["lora_a"][1].copy_(new["lora_a"][1].nan_to_num(0.0))
        graph.replay()
        assert_close(y, _reference(p)[0], torch.float16, f"replay {seed}")


def _cuda_extension_runs() -> bool:
    if not torch.cuda.is_available():
        return False
    from fastpeft import cuda_ext

    return cuda_ext.available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("num_tokens", [5, 67, 600])  # decode, 16-row and 64-row segment tiles
def test_gpu_kernels_on_aligned_problems(monkeypatch, backend_name, dtype, lora_dtype, num_tokens):
    """On a GPU the kernels take 16-bit, aligned problems (others take the torch path): bf16 and
    fp16, PEFT's fp32 adapters, forward and every slot's gradient (``cuda``: the CUDA C++
    decode kernel for decode-sized forwards, the rest as ``auto``)."""
    if backend_name == "cuda" and not _cuda_extension_runs():
        pytest.skip("the CUDA extension is not built")
    monkeypatch.setenv("FASTPEFT_BACKEND", backend_name)
    ranks = [16, 5, 64, 0, 33]
    p = _problem(num_tokens, dtype, lora_dtype, ranks=ranks, seed=20, k=128, n=96)
    grad = torch.randn(num_tokens, 96, generator=torch.Generator().manual_seed(21)).to(dtype).to(DEVICE)
    expected, grads = _reference(p, grad)
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
    y = multi_lora_linear(**{**p, **leaves})
    assert_close(y, expected, dtype, "y")
    y.backward(grad)
    assert_close(leaves["x"].grad, grads["x"], dtype, "dX")
    for what in ("lora_a", "lora_b"):
        _slot_grad_close(leaves[what].grad, grads[what], ranks, dtype, what)


def test_host_and_sorted_grouping_agree(monkeypatch):
    """The torch path's two ways of grouping tokens by adapter (a Python dict up to
    HOST_GROUPING_MAX_TOKENS CPU tokens, a sort above) give the same groups: slots in order,
    each with its tokens in token order and its clamped rank; ids outside [0, L) and slots of
    rank 0 skipped."""
    from fastpeft.ops import multi_lora_linear_torch as torch_path

    ids = torch.tensor([3, -1, 0, 3, 7, 2, 0, 5, 3, 9, -4, 2])
    ranks = torch.tensor([4, 8, 0, 20, 2, 1, 3, 6])  # slot 2: rank 0; slot 3: clamped to 16
    found = []
    for limit in (len(ids), len(ids) - 1):
        monkeypatch.setattr(torch_path, "HOST_GROUPING_MAX_TOKENS", limit)
        found.append([(g.slot, g.rank, g.tokens.tolist()) for g in torch_path.adapter_groups(ids, ranks, 16)])
    assert found[0] == found[1] == [(0, 4, [2, 6]), (3, 16, [0, 3, 8]), (5, 1, [7]), (7, 6, [4])]
