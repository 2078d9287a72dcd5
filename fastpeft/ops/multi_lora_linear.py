"""The multi-adapter LoRA linear op: one base linear, many LoRA adapters, one adapter per token.

    y[t] = x[t] W^T + b + scalings[i] * x[t] A_i[:r_i]^T B_i[:, :r_i]^T,   i = adapter_ids[t]

registered with torch.library (fake tensors, autograd): ``torch.ops.fastpeft.multi_lora_linear``
and ``torch.ops.fastpeft.multi_lora_linear_backward``. The base GEMM is ``F.linear`` (cuBLAS on
a GPU); the LoRA term is added into its output in place by one of:

- the torch path (``multi_lora_linear_torch``): CPU tensors, float64, and the default on CUDA
  until the kernels have run on a GPU (``fastpeft.backend``), unless the table ``fastpeft
  tune`` made on that GPU picks a kernel for the forward (``implementation``);
- the Triton kernels (``fastpeft.kernels.multi_lora``), opt-in with ``FASTPEFT_BACKEND=triton``:
  decode kernels (one row per token, no sort) up to ``DECODE_MAX_TOKENS`` tokens, sorted
  segments above and in every backward;
- the CUDA C++ decode kernel (``fastpeft.kernels.multi_lora.cuda_launch``), opt-in with
  ``FASTPEFT_BACKEND=cuda`` for decode-sized forwards on CUDA tensors (up to
  ``DECODE_MAX_TOKENS`` tokens); larger forwards and the backward then take the Triton
  kernels where ``fastpeft.backend.use_triton`` says so, else the torch path.

Invalid ids and ranks: on CPU tensors an id outside ``[-1, L)`` or a rank outside
``[0, R_MAX]`` raises ``ValueError`` (checking costs no sync there). On a GPU nothing is
checked (a check would read device memory on the host and break CUDA graphs): an id outside
``[0, L)`` means "no adapter" (the base output, no slot read) and ranks are clamped to
``[0, R_MAX]``, on every path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpeft.backend import follows_tuned_table, use_cuda_extension, use_triton
from fastpeft.kernels import tuned_table
from fastpeft.ops.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.ops.checks import describe, require_same_device, require_tensor
from fastpeft.ops.lora_linear_torch import base_linear_grads
from fastpeft.ops.multi_lora_linear_torch import multi_lora_add_torch, multi_lora_backward_torch
from fastpeft.ops.op_calls import call_directly, eager_function, op_for_call, rows

def _kernels_take(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether the kernels cover this problem: adapter dtype and slot rank, and on a GPU 16-bit
    activations and the aligned sizes and pointers ``fastpeft check`` compiled
    (``multi_lora.configs``); the interpreter also takes fp32 activations and any alignment."""
    from fastpeft.kernels.multi_lora import configs

    if lora_a.dtype not in configs.ADAPTER_DTYPES or lora_a.shape[1] > configs.MAX_SLOT_RANK:
        return False
    if x.device.type != "cuda":
        return x.dtype in (*configs.GPU_ACTIVATION_DTYPES, torch.float32)
    n, k = weight.shape
    return x.dtype in configs.GPU_ACTIVATION_DTYPES and configs.kernel_friendly((n, k), (lora_a, lora_b))


def _launchablerows(t: torch.Tensor) -> torch.Tensor:
    """2-D ``t`` with unit column stride and, on a GPU, an aligned pointer and row stride
    (``configs.kernel_friendly``): itself, or a contiguous copy."""
    from fastpeft.kernels.multi_lora import configs

    if t.shape[1] <= 1 or t.stride(1) == 1:
        if t.device.type != "cuda" or configs.kernel_friendly((t.stride(0),), (t,)):
            return t
    return t.contiguous()


def implementation(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   pass_: str) -> str:
    """``"torch"``, ``"triton"`` or ``"cuda"`` for this call's ``pass_`` (``"forward"`` or
    ``"backward"``) under ``FASTPEFT_BACKEND`` (read at every call). Under ``auto`` on a GPU the
    forward follows the table ``fastpeft tune`` made there (op ``"multi_lora"``, inference
    mode: tokens M, K -> N, the slots' rank R_MAX; ``fastpeft.kernels.tuned_table``) when it has
    entries for the dtype; the backward is not tuned (a serving op: ``fastpeft tune`` times
    forwards only) and follows ``use_triton``."""
    if not _kernels_take(x, weight, lora_a, lora_b):
        return "torch"
    from fastpeft.kernels.multi_lora.configs import DECODE_MAX_TOKENS

    tokens = math.prod(x.shape[:-1])
    if use_cuda_extension(x.device) and pass_ == "forward" and tokens <= DECODE_MAX_TOKENS:
        return "cuda"
    if pass_ == "forward" and follows_tuned_table(x.device):
        n, k = weight.shape
        # the CUDA C++ kernel is a decode kernel: above decode sizes the best of the others
        picked = tuned_table.tuned_choice(x.device, "multi_lora", tuned_table.INFERENCE, x.dtype, tokens, k, n,
                                          lora_a.shape[1], () if tokens <= DECODE_MAX_TOKENS else ("cuda",))
        if picked is not None:
            return picked if picked in ("triton", "cuda") else "torch"
    return "triton" if use_triton(x.device) else "torch"


def _kernel_args(x2, lora_a, lora_b, scalings, adapter_ids, ranks) -> tuple:
    """The arguments in the launchers' contract (``multi_lora.launch``): x with unit column
    stride (``_launchable_rows``), contiguous slots, fp32 scalings, int64 ids and ranks (the
    last three copied into fresh, aligned buffers: a few bytes per token)."""
    return (
        _launchablerows(x2), lora_a.contiguous(), lora_b.contiguous(),
        scalings.to(torch.float32, copy=True), adapter_ids.to(torch.int64, copy=True).reshape(-1),
        ranks.to(torch.int64, copy=True),
    )


def _cuda_decode():
    """``multi_lora.cuda_launch.multi_lora_decode`` (the CUDA C++ kernel), imported lazily."""
    try:
        from fastpeft.kernels.multi_lora.cuda_launch import multi_lora_decode
    except ImportError as exc:
        raise RuntimeError("FASTPEFT_BACKEND=cuda: the multi-LoRA CUDA decode kernel is not available "
                           f"(fastpeft.kernels.multi_lora.cuda_launch: {exc}); build fastpeft._C or use "
                           "FASTPEFT_BACKEND=triton") from exc
    return multi_lora_decode


def _multi_lora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
) -> torch.Tensor:
    """``y [..., N]`` for x ``[..., K]`` and ``adapter_ids`` with one id per row of x."""
    n, k = weight.shape
    _check_host_values(adapter_ids, ranks, *lora_a.shape[:2])
    x2 = rows(x, k)
    y = F.linear(x2, weight, bias)
    impl = implementation(x, weight, lora_a, lora_b, "forward")
    ids = adapter_ids.reshape(-1)
    if impl == "torch":
        multi_lora_add_torch(y, x2, lora_a, lora_b, scalings, ids, ranks)
    else:
        from fastpeft.kernels.multi_lora import configs

        if impl == "cuda":
            add = _cuda_decode()
        elif x2.shape[0] <= configs.DECODE_MAX_TOKENS:
            from fastpeft.kernels.multi_lora.launch import multi_lora_decode as add
        else:
            from fastpeft.kernels.multi_lora.launch import multi_lora_segments_add as add
        add(y, *_kernel_args(x2, lora_a, lora_b, scalings, ids, ranks))
    return y.view(*x.shape[:-1], n)


_multi_lora_linear_op = torch.library.custom_op("fastpeft::multi_lora_linear", mutates_args=())(
    _multi_lora_linear_forward
)


@_multi_lora_linear_op.register_fake
def _multi_lora_linear_fake(x, weight, bias, lora_a, lora_b, scalings, adapter_ids, ranks):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _multi_lora_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX like x, dA [L, R_MAX, K], dB [L, N, R_MAX])``; a gradient not asked for is empty.
    dA and dB are zero for slots no token uses and past each slot's rank."""
    n, k = weight.shape
    g2, x2 = rows(grad_y, n), rows(x, k)
    ids = adapter_ids.reshape(-1)
    dx = g2 @ weight if need_x else None
    if implementation(x, weight, lora_a, lora_b, "backward") == "torch":
        da, db = multi_lora_backward_torch(g2, x2, dx, lora_a, lora_b, scalings, ids, ranks, need_a, need_b)
    else:
        from fastpeft.kernels.multi_lora.launch import multi_lora_backward

        args = _kernel_args(x2, lora_a, lora_b, scalings, ids, ranks)
        g2 = _launchablerows(g2)
        da, db = multi_lora_backward(g2, args[0], dx, *args[1:], need_a, need_b)
    return (
        dx.view(x.shape) if dx is not None else x.new_empty(0),
        da if da is not None else x.new_empty(0),
        db if db is not None else x.new_empty(0),
    )


_multi_lora_linear_backward_op = torch.library.custom_op("fastpeft::multi_lora_linear_backward", mutates_args=())(
    _multi_lora_linear_backward
)


@_multi_lora_linear_backward_op.register_fake
def _multi_lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, scalings, adapter_ids, ranks, need_x,
                                     need_a, need_b):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty(0),
        lora_a.new_empty(lora_a.shape) if need_a else x.new_empty(0),
        lora_b.new_empty(lora_b.shape) if need_b else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scalings, adapter_ids, ranks = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scalings, adapter_ids, ranks)


def _differentiable_backward(grad_y, x, weight, lora_a, lora_b, scalings, adapter_ids, ranks, need_x, need_a,
                             need_b):
    """The backward as torch ops autograd records (``create_graph=True``). Not on meta tensors:
    it groups the tokens by the values of ``adapter_ids`` and ``ranks``, which they lack."""
    if x.is_meta:
        raise NotImplementedError(
            "multi_lora_linear: the double backward (create_graph=True) is not available on meta tensors: it groups "
            "the tokens by the values of adapter_ids and ranks, which meta tensors do not hold (the first backward "
            "runs on meta tensors)")
    n, k = weight.shape
    g2, x2 = rows(grad_y, n), rows(x, k)
    dx = g2 @ weight if need_x else None
    da, db = multi_lora_backward_torch(g2, x2, dx, lora_a, lora_b, scalings, adapter_ids.reshape(-1), ranks,
                                       need_a, need_b)
    return dx.view(x.shape) if dx is not None else None, da, db


def _backward(ctx, grad_y):
    x, weight, lora_a, lora_b, scalings, adapter_ids, ranks = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    args = (grad_y, x, weight, lora_a, lora_b, scalings, adapter_ids, ranks, need_x, need_a, need_b)
    if torch.is_grad_enabled():
        dx, da, db = _differentiable_backward(*args)
    else:
        direct = call_directly(grad_y, x, weight, lora_a, lora_b, scalings)
        op = _multi_lora_linear_backward if direct else torch.ops.fastpeft.multi_lora_linear_backward
        dx, da, db = op(*args)
    dw, dbias = base_linear_grads(grad_y, x, weight, need_w, need_bias)
    return (dx if need_x else None, dw, dbias, da if need_a else None, db if need_b else None, None, None, None)


_multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)

# Eager training calls on plain tensors apply the registered forward/backward through this
# Function instead of the custom op's dispatch (``op_calls``).
_MultiLoRAFunction = eager_function("MultiLoRALinearFunction", _multi_lora_linear_forward, _setup_context, _backward)


def _require_int_tensor(name: str, value: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} ({describe(value)}) must have an integer dtype (int32 or int64)")
    if tuple(value.shape) != shape and value.numel() != math.prod(shape):
        raise ValueError(f"{name} ({describe(value)}) must have shape {shape}")
    return value


def _check_host_values(adapter_ids: torch.Tensor, ranks: torch.Tensor, num_slots: int, r_max: int) -> None:
    """On CPU tensors (no sync to pay): ids in ``[-1, L)``, ranks in ``[0, R_MAX]``. Run inside
    the op's implementation, so it also holds under ``torch.compile`` (which does not trace
    into it)."""
    if adapter_ids.device.type != "cpu":
        return
    if adapter_ids.numel() and not _within(adapter_ids, -1, num_slots - 1):
        bad = (adapter_ids < -1) | (adapter_ids >= num_slots)
        position = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"adapter_ids[{position}] = {int(adapter_ids.reshape(-1)[position])} is outside "
                         f"[-1, {num_slots}) (lora_a has {num_slots} adapter slots; -1 = no adapter)")
    if ranks.numel() and not _within(ranks, 0, r_max):
        raise ValueError(f"ranks {ranks.tolist()} must lie in [0, {r_max}] (R_MAX = lora_a.shape[1])")


def _within(t: torch.Tensor, low: int, high: int) -> bool:
    """Whether every element of non-empty integer ``t`` lies in ``[low, high]`` (one reduction,
    two host reads)."""
    smallest, largest = torch.aminmax(t)
    return low <= int(smallest) and int(largest) <= high


def check_multi_lora_linear_args(x, weight, bias, lora_a, lora_b, scalings, adapter_ids, ranks) -> None:
    """Validate ``multi_lora_linear``'s arguments (see its docstring); errors name the argument."""
    require_tensor("x", x)
    require_tensor("weight", weight, ndim=2)
    require_tensor("lora_a", lora_a, ndim=3)
    require_tensor("lora_b", lora_b, ndim=3)
    require_tensor("scalings", scalings, ndim=1)
    if bias is not None:
        require_tensor("bias", bias, ndim=1)
    n, k = weight.shape
    num_slots, r_max, a_k = lora_a.shape
    if x.shape[-1] != k:
        raise ValueError(f"x ({describe(x)}): last dimension must equal weight's in_features {k}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match x dtype {x.dtype}")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias ({describe(bias)}) must have shape ({n},) to match weight {tuple(weight.shape)}")
    if a_k != k:
        raise ValueError(f"lora_a ({describe(lora_a)}) must have shape (L, R_MAX, {k}) to match weight")
    if tuple(lora_b.shape) != (num_slots, n, r_max):
        raise ValueError(f"lora_b ({describe(lora_b)}) must have shape ({num_slots}, {n}, {r_max}) to match "
                         f"weight {tuple(weight.shape)} and lora_a {tuple(lora_a.shape)}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b dtype {lora_b.dtype} must match lora_a dtype {lora_a.dtype}")
    if tuple(scalings.shape) != (num_slots,):
        raise ValueError(f"scalings ({describe(scalings)}) must have shape ({num_slots},): one per adapter slot")
    _require_int_tensor("adapter_ids", adapter_ids, tuple(x.shape[:-1]))
    if ranks is not None:
        _require_int_tensor("ranks", ranks, (num_slots,))
    require_same_device({"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b,
                         "scalings": scalings, "adapter_ids": adapter_ids, "ranks": ranks})


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer with a different LoRA adapter per token (HF PEFT's ``adapter_names``
    mixed batch, batched): ``y[t] = x[t] W^T + b + scalings[i] x[t] A_i^T B_i^T``.

    Args:
        x: ``[T, K]`` tokens, or ``[..., K]`` (``adapter_ids`` then has x's leading shape, or
            T elements); float32 / float16 / bfloat16 (float64 on the torch path).
        weight: ``[N, K]`` base weight, x's dtype. bias: ``[N]`` in x's dtype, or None.
        lora_a: ``[L, R_MAX, K]`` adapter slots' A; lora_b: ``[L, N, R_MAX]`` their B (same
            dtype: x's, or float32 on a 16-bit x, PEFT's default).
        scalings: ``[L]`` per-slot scaling (``lora_alpha / r``).
        adapter_ids: one integer per token: the slot of its adapter, ``-1`` for the base only.
        ranks: ``[L]`` integers, slot i uses its first ``ranks[i]`` rows of A_i and columns of
            B_i (the rest of the slot is never read); None: all ``R_MAX``.

    Out-of-range ids and ranks: see the module docstring (ValueError on CPU; on a GPU an
    invalid id means no adapter and ranks are clamped). The op never synchronizes with the
    host on a GPU, on any path (the torch path's static formulation there:
    ``multi_lora_linear_torch``), so a step can be captured in a CUDA graph and replayed
    with other ids, ranks and slot contents.

    Under ``torch.autocast`` it casts like ``F.linear`` (x, weight, bias, lora_a, lora_b).
    On meta tensors it propagates shapes, forward and backward (not the double backward).

    Returns:
        ``[..., N]`` in x's dtype. Differentiable in x, lora_a and lora_b (every slot's
        gradient in one backward, deterministic; slots no token uses get zeros), and in
        weight / bias if they require grad; not in scalings.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        x, weight, bias, lora_a, lora_b = cast_for_autocast(dtype, x, weight, bias, lora_a, lora_b)
        with autocast_off(device_type):
            return multi_lora_linear(x, weight, bias, lora_a, lora_b, scalings, adapter_ids, ranks)
    check_multi_lora_linear_args(x, weight, bias, lora_a, lora_b, scalings, adapter_ids, ranks)
    num_slots, r_max, _ = lora_a.shape
    if ranks is None:
        ranks = torch.full((num_slots,), r_max, dtype=torch.int64, device=x.device)
    adapter_ids = adapter_ids.reshape(x.shape[:-1])
    scalings = scalings.to(torch.promote_types(lora_a.dtype, torch.float32))
    args = (x, weight, bias, lora_a, lora_b, scalings, adapter_ids, ranks)
    op = op_for_call(_multi_lora_linear_forward, _MultiLoRAFunction, torch.ops.fastpeft.multi_lora_linear,
                     x, weight, bias, lora_a, lora_b, scalings)
    return op(*args)
