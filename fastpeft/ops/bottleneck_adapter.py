"""The fused bottleneck adapter op (Houlsby / Pfeiffer adapters), registered with
torch.library (autograd, fake tensors).

    out = residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)

``torch.ops.fastpeft.bottleneck_adapter`` holds the forward (returning ``out``, the
pre-activation ``z [M, R]`` and the torch path's dropout mask, the only activations it saves
besides its inputs) and ``torch.ops.fastpeft.bottleneck_adapter_backward`` the backward; each
dispatches, per call, to the fused Triton kernels (``fastpeft.kernels.bottleneck.launch``),
the CUDA C++ kernels (``cuda_launch``, ``FASTPEFT_BACKEND=cuda``) or the torch path
(``bottleneck_adapter_torch``), following ``fastpeft.backend`` and, under ``auto`` on a GPU, the
table ``fastpeft tune`` made there (``implementation``). Dropout draws from a 64-bit
seed tensor made on h's device (no host sync, CUDA-graph safe); the kernels regenerate the
mask from it in the backward, the torch path keeps it (one byte per element) unless the
kernels' mask kernel can redraw it (``fastpeft.ops.dropout``).

A learned scaling (AdapterHub's ``scaling="learned"``) is a tensor input of the op, read on the
device, and gets a gradient; a float scaling is a constant of the graph.

Eager calls on plain tensors that take the torch path skip the custom op (``op_calls``): with
no autograd they call the torch path's forward directly, and small ones needing autograd
(``RECORDED_MAX_ELEMENTS``) run it as torch ops that autograd records, so their backward runs
in C++ like AdapterHub's module's instead of as ~15 Python-level calls.
"""

from __future__ import annotations

import importlib
import math

import torch

from fastpeft.backend import follows_tuned_table, resolve_choice, use_cuda_extension, use_triton
from fastpeft.kernels.bottleneck.configs import MAX_RANK, kernel_friendly
from fastpeft.kernels import tuned_table
from fastpeft.kernels.bottleneck.ref import canonical_activation
from fastpeft.kernels.dropout_mask import draw_seed
from fastpeft.ops.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.ops.bottleneck_adapter_torch import (
    bottleneck_backward_torch,
    bottleneck_forward_torch,
    down_projection,
)
from fastpeft.ops.dropout import kept_mask, rebuilt_keep_mask, redraws_mask, saved_or_redrawn_mask
from fastpeft.ops.checks import describe, require_finite, require_probability, require_same_device, require_tensor
from fastpeft.ops.lora_linear_torch import rank_side_dtype
from fastpeft.ops.op_calls import call_directly, eager_function, eager_plain, needs_autograd, op_for_call, rows

TRITON, CUDA, TORCH = "triton", "cuda", "torch"
# Largest bottleneck the CUDA C++ kernels take (``csrc/bottleneck.cu``); the Triton kernels'
# is ``configs.MAX_RANK`` (also 256).
CUDA_MAX_RANK = 256
_HALF = (torch.float16, torch.bfloat16)
# Eager torch-path calls needing autograd on h with at most this many elements are recorded
# by autograd op by op (``_torch_path_forward``; its backward runs in C++) instead of running
# the op's backward, whose ~15 Python-level torch calls cost more than the [M, D] passes its
# fused GEMMs save on small problems. One thread, fp32, forward+backward, measured 2026-11-29:
# recorded 2.3x / 1.4x / 1.35x faster at M*D = 6k / 25k / 49k (M = 8, 32, 64 at D = 768,
# R = 16), even at 98k-262k, and the op's backward ~1.1x faster from 197k (M = 256 at D = 768)
# on. 65536 stays below the crossover for R up to 64 and D up to 4096; it bounds what the
# recorded ops save beyond the op's own (the dropped-out input with dropout, an fp32 copy of a
# 16-bit h under an fp32 adapter) to 256 KiB.
RECORDED_MAX_ELEMENTS = 65536


def implementation(h: torch.Tensor, w_down: torch.Tensor, choice: str, residual: torch.Tensor | None = None,
                    training: bool = False, dropout: bool = False) -> str:
    """``"cuda"``, ``"triton"`` or ``"torch"`` for the resolved backend ``choice``
    (``fastpeft.backend``) in an inference forward, or in either pass of a training step
    (``training``; ``dropout``: with dropout). Float64 and empty problems always take the torch
    path, and so do bottlenecks above a kernel path's limit (CUDA_MAX_RANK,
    ``configs.MAX_RANK``) and, for Triton, CUDA inputs its ahead-of-time check does not cover
    (``configs.kernel_friendly``). ``cuda`` runs the CUDA C++ kernels on CUDA tensors;
    ``auto`` on a GPU follows the table ``fastpeft tune`` made there (op ``"bottleneck"``, K = N
    = D, r = R: ``fastpeft.kernels.tuned_table``), if it has entries for this mode and dtype,
    else ``fastpeft.backend.use_triton``. A pure function of shapes, dtypes, device and
    settings, so the forward and its fake agree; a backward whose forward kept a dropout mask
    takes the torch path, the one that reads it (``_bottleneck_backward``)."""
    rank = w_down.shape[0]
    if torch.float64 in (h.dtype, w_down.dtype) or h.numel() == 0:
        return TORCH
    if use_cuda_extension(h.device, choice):
        return CUDA if rank <= CUDA_MAX_RANK else TORCH
    if follows_tuned_table(h.device, choice):
        d = h.shape[-1]
        picked = tuned_table.tuned_choice(h.device, "bottleneck", tuned_table.mode_of(training, dropout), h.dtype,
                                          h.numel() // d, d, d, rank)
        if picked == CUDA:
            return CUDA if rank <= CUDA_MAX_RANK else TORCH
        if picked is not None:
            return TRITON if picked == TRITON and rank <= MAX_RANK and kernel_friendly(h, residual) else TORCH
    if rank <= MAX_RANK and use_triton(h.device, choice) and kernel_friendly(h, residual):
        return TRITON
    return TORCH


def _launcher(impl: str):
    """The module with ``bottleneck_forward`` / ``bottleneck_backward`` for a kernel path,
    imported at the first call (the Triton one imports Triton; the CUDA one needs the built
    extension)."""
    if impl == TRITON:
        return importlib.import_module("fastpeft.kernels.bottleneck.launch")
    try:
        return importlib.import_module("fastpeft.kernels.bottleneck.cuda_launch")
    except ImportError as exc:
        raise RuntimeError(
            "FASTPEFT_BACKEND=cuda: the bottleneck adapter's CUDA C++ implementation is not available "
            f"({exc}); build the extension (CMakeLists.txt, needs nvcc) or choose another backend"
        ) from exc


def _scaling_arg(scaling: float, scaling_t: torch.Tensor | None) -> float | torch.Tensor:
    """The scaling the implementations take: the 0-d tensor if given, else the float."""
    return scaling_t.reshape(()) if scaling_t is not None else scaling


def _bottleneck_forward(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scaling: float,
    scaling_t: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
    backend: str,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out like h, z [M, R] in rank_side_dtype, keep)``; ``keep`` the torch path's bool
    ``[M, D]`` dropout mask, empty on the kernel paths or without dropout. ``training``: a
    backward follows (the implementation is the training step's, ``implementation``)."""
    scale = _scaling_arg(scaling, scaling_t)
    impl = implementation(h, w_down, backend, residual, training, dropout_p > 0.0)
    if impl == TORCH:
        out, z, keep = _torch_path_forward(h, w_down, b_down, w_up, b_up, residual, activation, scale, dropout_p, seed)
        return out, z, kept_mask(keep)
    h2, res2 = _as_rows(h, residual)
    out, z = _launcher(impl).bottleneck_forward(h2, w_down, b_down, w_up, b_up, res2, activation, scale, dropout_p,
                                                seed)
    return _like(out, h), z, h.new_empty(0, dtype=torch.bool)


def _torch_path_forward(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                        b_up: torch.Tensor | None, residual: torch.Tensor | None, activation: str,
                        scaling: float | torch.Tensor, dropout_p: float,
                        seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out like h, z, keep)`` from ``bottleneck_forward_torch`` for h ``[..., D]``: the op's
    torch path, and the eager calls that skip the op (``bottleneck_adapter``), whose ops
    autograd, if on, records. ``scaling`` is a float or a 0-d tensor; ``seed`` may be None
    without dropout."""
    h2, res2 = _as_rows(h, residual)
    out, z, keep = bottleneck_forward_torch(h2, w_down, b_down, w_up, b_up, res2, activation, scaling, dropout_p, seed)
    return _like(out, h), z, keep


def _as_rows(h: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h and the residual as 2-D ``[M, D]`` (2-D ones as they are: a reshape costs ~2 us, a
    tenth of a decode step's adapter on the CPU)."""
    if h.dim() == 2:
        return h, residual
    d = h.shape[-1]
    return rows(h, d), rows(residual, d) if residual is not None else None


def _like(out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The 2-D ``out`` in h's shape."""
    return out if h.dim() == 2 else out.view(h.shape)


_forward_op = torch.library.custom_op("fastpeft::bottleneck_adapter", mutates_args=())(_bottleneck_forward)

@_forward_op.register_fake
def _bottleneck_fake(h, w_down, b_down, w_up, b_up, residual, activation, scaling, scaling_t, dropout_p, seed,
                     backend, training=False):
    m = math.prod(h.shape[:-1])
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    z = h.new_empty((m, w_down.shape[0]), dtype=rank_side_dtype(w_down.dtype))
    saves_mask = (dropout_p > 0.0 and implementation(h, w_down, backend, residual, training, True) == TORCH
                  and not redraws_mask(h.device))
    keep = h.new_empty((m, h.shape[-1]) if saves_mask else (0,), dtype=torch.bool)
    return out, z, keep


def _bottleneck_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    z: torch.Tensor,
    keep: torch.Tensor,
    activation: str,
    scaling: float,
    scaling_t: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
    backend: str,
    residual_is_h: bool,
    need_h: bool,
    need_w_down: bool,
    need_b_down: bool,
    need_w_up: bool,
    need_b_up: bool,
    need_scaling: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh like h, dW_down, db_down, dW_up, db_up, dscaling 0-d in z's dtype)``; a gradient not asked
    for is an empty tensor. The kernel paths regenerate the dropout mask from ``seed``; the
    torch path uses ``keep``, or, when it kept none (a kernel path ran the forward, or the
    mask is redrawn), draws the kernels' Philox mask (``fastpeft.ops.dropout.saved_or_redrawn_mask``)."""
    d = h.shape[-1]
    g2, h2 = rows(grad_out, d), rows(h, d)
    needs = (need_h, need_w_down, need_b_down, need_w_up, need_b_up, need_scaling)
    scale = _scaling_arg(scaling, scaling_t)
    # A kept mask: the torch path ran the forward with a mask not drawn from the seed (torch's
    # CUDA generator), which only the torch backward reads.
    impl = TORCH if keep.numel() else implementation(h, w_down, backend, None, True, dropout_p > 0.0)
    if impl == TORCH:
        keep = saved_or_redrawn_mask(keep, h2, dropout_p, seed)
        grads = bottleneck_backward_torch(g2, h2, w_down, w_up, b_up, z, keep, activation, scale, dropout_p,
                                          residual_is_h, needs)
    else:
        grads = _launcher(impl).bottleneck_backward(g2, h2, w_down, w_up, b_up, z, activation, scale, dropout_p,
                                                    seed, residual_is_h, needs)
    grads = list(grads)
    if grads[0] is not None:
        grads[0] = grads[0].view(h.shape)
    if grads[5] is not None:
        grads[5] = grads[5].to(z.dtype)
    return tuple(t if t is not None else h.new_empty(0) for t in grads)


_backward_op = torch.library.custom_op("fastpeft::bottleneck_adapter_backward", mutates_args=())(
    _bottleneck_backward
)


@_backward_op.register_fake
def _bottleneck_backward_fake(grad_out, h, w_down, w_up, b_up, z, keep, activation, scaling, scaling_t, dropout_p,
                              seed, backend, residual_is_h, need_h, need_w_down, need_b_down, need_w_up, need_b_up,
                              need_scaling):
    def maybe(needed: bool, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return h.new_empty(shape if needed else (0,), dtype=dtype if needed else h.dtype)

    w_dtype = w_down.dtype
    rank, d = w_down.shape
    return (
        maybe(need_h, tuple(h.shape), h.dtype),
        maybe(need_w_down, (rank, d), w_dtype),
        maybe(need_b_down, (rank,), w_dtype),
        maybe(need_w_up, (d, rank), w_dtype),
        maybe(need_b_up, (d,), w_dtype),
        maybe(need_scaling, (), z.dtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    h, w_down, b_down, w_up, b_up, residual, activation, scaling, scaling_t, dropout_p, seed, backend, _ = inputs
    _, z, keep = output
    ctx.mark_non_differentiable(z, keep)
    ctx.save_for_backward(h, w_down, b_down, w_up, b_up, z, keep, seed, scaling_t)
    ctx.activation = activation
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.residual_is_h = residual is None
    ctx.backend = backend


def _differentiable_backward(grad_out, h, w_down, b_down, w_up, b_up, keep, seed, scaling_t, ctx, needs):
    """The backward as plain torch ops that autograd records, for ``create_graph=True``
    (double backward): z is recomputed with autograd instead of read from the
    non-differentiable saved copy; the mask is the forward's (``fastpeft.ops.dropout.saved_or_redrawn_mask``)."""
    d = h.shape[-1]
    h2 = rows(h, d)
    keep = saved_or_redrawn_mask(keep, h2, ctx.dropout_p, seed)
    z = down_projection(h2, w_down, b_down, ctx.dropout_p, keep)
    grads = bottleneck_backward_torch(rows(grad_out, d), h2, w_down, w_up, b_up, z, keep, ctx.activation,
                                      _scaling_arg(ctx.scaling, scaling_t), ctx.dropout_p, ctx.residual_is_h, needs)
    return (grads[0].view(h.shape) if grads[0] is not None else None, *grads[1:])


def _backward(ctx, grad_out, _grad_z, _grad_keep):
    h, w_down, b_down, w_up, b_up, z, keep, seed, scaling_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = (need[0], need[1], need[2], need[3], need[4], need[8])
    if torch.is_grad_enabled():
        grads = _differentiable_backward(grad_out, h, w_down, b_down, w_up, b_up, keep, seed, scaling_t, ctx, needs)
    else:
        args = (grad_out, h, w_down, w_up, b_up, z, keep, ctx.activation, ctx.scaling, scaling_t, ctx.dropout_p, seed,
                ctx.backend, ctx.residual_is_h, *needs)
        direct = call_directly(*args[:7], seed, scaling_t)
        op = _bottleneck_backward if direct else torch.ops.fastpeft.bottleneck_adapter_backward
        grads = op(*args)
    grad_h, grad_wd, grad_bd, grad_wu, grad_bu, grad_s = (g if n else None for g, n in zip(grads, needs))
    if grad_s is not None:
        grad_s = grad_s.to(scaling_t.dtype).reshape(scaling_t.shape)
    return (grad_h, grad_wd, grad_bd, grad_wu, grad_bu, grad_out if need[5] else None, None, None, grad_s, None, None,
            None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)

# Eager training calls on plain tensors apply the registered forward/backward through this
# Function instead of the custom op's dispatch (``op_calls``).
_BottleneckFunction = eager_function("BottleneckAdapterFunction", _bottleneck_forward, _setup_context, _backward)


def check_bottleneck_adapter_args(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
    scaling: float | torch.Tensor,
    residual: torch.Tensor | None,
    dropout_p: float,
) -> str:
    """Validate the arguments of ``bottleneck_adapter``; returns the canonical activation name."""
    require_tensor("h", h)
    require_tensor("w_down", w_down, ndim=2)
    require_tensor("w_up", w_up, ndim=2)
    rank, d = w_down.shape
    if h.shape[-1] != d:
        raise ValueError(f"h ({describe(h)}): last dimension must equal w_down's input size {d} "
                         f"(w_down {tuple(w_down.shape)}, expected [R, D])")
    if rank == 0:
        raise ValueError(f"w_down ({describe(w_down)}) has bottleneck size 0; R must be >= 1")
    if tuple(w_up.shape) != (d, rank):
        raise ValueError(f"w_up ({describe(w_up)}) must have shape ({d}, {rank}) "
                         f"to match w_down {tuple(w_down.shape)}")
    if w_up.dtype != w_down.dtype:
        raise TypeError(f"w_up dtype {w_up.dtype} must match w_down dtype {w_down.dtype}")
    if w_down.dtype != h.dtype and not (w_down.dtype == torch.float32 and h.dtype in _HALF):
        raise TypeError(f"adapter weights dtype {w_down.dtype} must match h dtype {h.dtype} "
                        "(or be float32 with a float16/bfloat16 h)")
    for name, bias, size in (("b_down", b_down, rank), ("b_up", b_up, d)):
        if bias is None:
            continue
        require_tensor(name, bias, ndim=1)
        if bias.shape[0] != size:
            raise ValueError(f"{name} ({describe(bias)}) must have shape ({size},)")
        if bias.dtype != w_down.dtype:
            raise TypeError(f"{name} dtype {bias.dtype} must match the adapter weights' dtype {w_down.dtype}")
    if residual is not None:
        require_tensor("residual", residual)
        if residual.shape != h.shape or residual.dtype != h.dtype:
            raise ValueError(f"residual ({describe(residual)}) must have h's shape and dtype ({describe(h)})")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1 or scaling.dim() > 1 or not scaling.is_floating_point():
            raise ValueError(f"scaling tensor ({describe(scaling)}) must be a floating 0-d or 1-element tensor")
    else:
        require_finite("scaling", scaling)
    require_same_device({"h": h, "w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up, "residual": residual,
                         "scaling": scaling if isinstance(scaling, torch.Tensor) else None})
    require_probability("dropout_p", dropout_p)
    return canonical_activation(activation)


def bottleneck_adapter(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str = "relu",
    scaling: float | torch.Tensor = 1.0,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """A bottleneck adapter, fused: ``residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up)``.

    Args:
        h: ``[..., D]`` hidden states, float32 / float16 / bfloat16 / float64, any strides.
        w_down: ``[R, D]`` down-projection (``nn.Linear(D, R).weight``).
        b_down: ``[R]`` or None.
        w_up: ``[D, R]`` up-projection (``nn.Linear(R, D).weight``).
        b_up: ``[D]`` or None.
        activation: "relu", "gelu" (erf), "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast"
            (tanh approximation), "silu" / "swish", "linear" / "identity" (AdapterHub's
            names, case-insensitive).
        scaling: a float, or a 1-element tensor (AdapterHub's ``scaling="learned"``), which
            then gets a gradient.
        residual: like h; defaults to h.
        dropout_p: dropout probability on the adapter's input, in [0, 1).
        training: dropout is applied only when True.
        backend: force ``"triton"``, ``"cuda"`` or ``"torch"`` for this call (as
            ``FASTPEFT_BACKEND`` does); None follows the environment.

    The weights (and biases) are in h's dtype, or float32 with a 16-bit h: the branch then runs
    in float32 (as PEFT runs an fp32 adapter; AdapterHub itself would need autocast) and only
    the output is rounded to h's dtype. Under ``torch.autocast`` every input but float64 ones
    is cast to the autocast dtype first, as ``F.linear`` does.

    Returns:
        ``[..., D]`` in h's dtype (fp32 accumulation). Differentiable in every tensor input.
        Saves h, the weights, ``z [M, R]`` (fp32) and the seed for backward; the kernels
        regenerate the dropout mask, the torch path keeps it as one byte per element. Eager
        torch-path calls on at most ``RECORDED_MAX_ELEMENTS`` elements of h (decode, small
        batches) instead run as torch ops that autograd records and differentiates in C++
        (saving what those ops save, at most a few [M, D] copies of that size): there the op's
        Python backward would cost more than the whole adapter.
    """
    choice = resolve_choice(backend)
    device_type = h.device.type if isinstance(h, torch.Tensor) else "cpu"
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        h, w_down, b_down, w_up, b_up, residual = cast_for_autocast(dtype, h, w_down, b_down, w_up, b_up, residual)
        with autocast_off(device_type):
            return bottleneck_adapter(h, w_down, b_down, w_up, b_up, activation, scaling, residual, dropout_p, training,
                                      choice)
    act = check_bottleneck_adapter_args(h, w_down, b_down, w_up, b_up, activation, scaling, residual, dropout_p)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(h.device) if p > 0.0 else None
    scaling_t = scaling if isinstance(scaling, torch.Tensor) else None
    scaling_f = 1.0 if scaling_t is not None else float(scaling)
    tensors = (h, w_down, b_down, w_up, b_up, residual, scaling_t)
    backward_follows = needs_autograd(*tensors)
    # Eager only (never traced: the implementation's choice may read the tuned table's file).
    eager_torch_path = call_directly(*tensors) or (h.numel() <= RECORDED_MAX_ELEMENTS and eager_plain(*tensors))
    if eager_torch_path and implementation(h, w_down, choice, residual, backward_follows, p > 0.0) == TORCH:
        # The torch path as plain torch ops (see RECORDED_MAX_ELEMENTS).
        out, _, _ = _torch_path_forward(h, w_down, b_down, w_up, b_up, residual, act,
                                        _scaling_arg(scaling_f, scaling_t), p, seed)
        return out
    if seed is None:
        seed = h.new_empty(0, dtype=torch.int64)
    op = op_for_call(_bottleneck_forward, _BottleneckFunction, torch.ops.fastpeft.bottleneck_adapter, *tensors)
    out, _, _ = op(h, w_down, b_down, w_up, b_up, residual, act, scaling_f, scaling_t, p, seed, choice,
                   backward_follows)
    return out


def bottleneck_adapter_dropout_mask(seed: torch.Tensor, m: int, d: int, dropout_p: float,
                                    backend: str | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The bool keep-mask ``[m, d]`` the op draws for ``seed`` (a 1-element int64 tensor) with
    ``backend`` (None: ``FASTPEFT_BACKEND``) on ``seed.device``: the kernels' Philox bits where the
    setting sends the call to a kernel path, else the torch path's draw; with ``keep`` (the
    ``keep`` output of ``torch.ops.fastpeft.bottleneck_adapter``'s call), the mask that call drew
    whichever implementation ran it -- under ``auto`` on a GPU with a tuned table, only ``keep``
    tells (``fastpeft.ops.dropout.rebuilt_keep_mask``). Tests use it to rebuild a forward's
    dropout.

    Raises:
        ValueError: without ``keep``, the torch path on CUDA without the kernels, which draws
            its mask from torch's CUDA generator (``fastpeft.ops.dropout``).
    """
    choice = resolve_choice(backend)
    kernel_path = use_triton(seed.device, choice) or use_cuda_extension(seed.device, choice)
    return rebuilt_keep_mask(seed, m, d, dropout_p, kernel_path, keep)
