"""How every fastpeft op is called in eager mode (shared by the LoRA, bottleneck-adapter and
multi-LoRA ops).

Each op is a ``torch.library`` custom op with a fake implementation and autograd, which is
what ``torch.compile``, ``opcheck``, fake tensors and tensor subclasses (DTensor) need. The
custom op's dispatch costs ~0.1 ms of Python per call, though, more than a decode step's
kernels or a small layer's CPU math. Eager calls on plain tensors therefore skip it
(``op_for_call``):

- no autograd needed (inference, or the backward itself, which autograd runs with grad
  off): the op's implementation is called as a plain function;
- autograd needed: the op's own forward, ``setup_context`` and backward are applied through
  an ``autograd.Function`` (``eager_function``), so eager training computes exactly what the
  registered autograd computes.

Meta tensors take the dispatcher, like tensor subclasses: its Meta kernels are the ops' fake
implementations, so the ops propagate shapes and dtypes on them, forward and backward, as
``F.linear`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

# Tensor types the eager shortcuts take; subclasses (DTensor, fake and functorch tensors...)
# go through the dispatcher, which knows what to do with them.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t [..., cols]`` as a 2-D ``[M, cols]`` view (or copy); also for ``cols == 0`` and
    ``M == 0``, where ``reshape(-1, cols)`` is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), cols)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``, with no call when it already is: a no-op ``.to`` costs ~3 us of Python,
    a tenth of a decode step's whole adapter on the CPU."""
    return t if t.dtype == dtype else t.to(dtype)


def eager_plain(*tensors: torch.Tensor | None) -> bool:
    """Whether a call needs nothing from the dispatcher but autograd: eager (not traced) on
    plain tensors holding data (None entries are ignored; the first is a tensor, and the ops'
    checks put all of them on its device).

    Meta tensors go to the dispatcher, whose Meta kernel of each op is its fake implementation
    (shapes and dtypes only, as ``F.linear`` on meta): the implementations may read values
    that meta tensors do not hold (the multi-LoRA torch path groups tokens by adapter id on
    the host)."""
    if torch.compiler.is_compiling() or tensors[0].is_meta:
        return False
    return all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors if t is not None)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a backward can follow a call on ``tensors``: grad mode on and one of them
    (None entries ignored) requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager call needs nothing from the dispatcher at all: ``eager_plain`` and no
    autograd (``needs_autograd`` false)."""
    return not needs_autograd(*tensors) and eager_plain(*tensors)


def eager_function(
    name: str,
    forward: Callable[..., Any],
    setup_context: Callable[[Any, tuple, Any], None],
    backward: Callable[..., Any],
) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` applying a custom op's forward, ``setup_context`` and
    backward (the functions given to ``torch.library.custom_op`` / ``register_autograd``).

    Its forward takes ``ctx`` itself: with a separate ``setup_context`` staticmethod torch
    binds every call's arguments to the forward's signature with ``inspect``, which costs
    about as much as the dispatch this avoids."""

    def function_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Eager autograd of ``{name}`` (``fastpeft.ops.op_calls.eager_function``).",
        "forward": staticmethod(function_forward),
        "backward": staticmethod(backward),
    })


def op_for_call(
    implementation: Callable[..., Any],
    function: type[torch.autograd.Function],
    custom_op: Callable[..., Any],
    *tensors: torch.Tensor | None,
) -> Callable[..., Any]:
    """What to call for these tensor arguments: the plain ``implementation``
    (``call_directly``), ``function.apply`` (eager autograd on plain tensors) or the
    registered ``custom_op`` (compiled, traced, subclasses)."""
    if call_directly(*tensors):
        return implementation
    if eager_plain(*tensors):
        return function.apply
    return custom_op
