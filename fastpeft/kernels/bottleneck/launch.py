"""Launchers of the bottleneck adapter's Triton kernels: the contract every implementation
of the op follows (``cuda_launch`` mirrors these two functions exactly).

    z   = dropout(h) W_down^T + b_down            (fp32, [M, R]; saved for the backward)
    out = residual + scaling * (act(z) W_up^T + b_up)

Contract (both functions):

- ``h``, ``residual``, ``grad_out``: 2-D ``[M, D]``, any strides (no copies), ``M >= 1``,
  ``D >= 1``; fp32, fp16 or bf16 (float64 always takes the torch path). ``residual`` and
  ``grad_out`` in h's dtype.
- ``w_down [R, D]``, ``w_up [D, R]``, any strides, ``1 <= R <= MAX_RANK`` (256); both in one
  dtype, h's dtype or fp32 (an fp32 adapter on a 16-bit model). Biases ``b_down [R]``,
  ``b_up [D]`` in the weights' dtype, any stride, or None.
- ``activation``: a canonical name from ``ref.CANONICAL_ACTIVATIONS`` ("relu", "gelu",
  "gelu_tanh", "silu", "identity"); the op resolves AdapterHub's aliases before calling.
- ``scaling``: a Python float, or a 0-d fp32 tensor on h's device (AdapterHub's learned
  scaling), read on the device (no host sync; CUDA-graph safe).
- ``dropout_p`` in ``[0, 1)``; ``seed`` a 1-element int64 tensor on h's device, read only when
  ``dropout_p > 0`` (it may be empty otherwise). The keep-mask is
  ``fastpeft.ops.dropout_mask.keep_mask_philox(seed, M, D, dropout_p)`` (Philox counters of
  element ``(m, d)``), regenerated in the backward, never stored.
- Arithmetic: fp32 accumulation; the bottleneck side (``z``, ``act(z)``, the products) is fp32;
  ``out = residual + scaling * u`` is formed in fp32 and rounded once to h's dtype.
- Outputs are fresh contiguous tensors; launches run on h's device (not torch's current one);
  no atomics, so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import torch


def bottleneck_forward(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scaling: float | torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [M, D] in h's dtype, z [M, R] fp32)``; ``residual`` None means h.

    ``z`` is the pre-activation ``dropout(h) W_down^T + b_down`` (dropout's ``1/(1-p)``
    included), the only activation the backward needs besides its inputs.
    """
    raise NotImplementedError


def bottleneck_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    z: torch.Tensor,
    activation: str,
    scaling: float | torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    residual_is_h: bool,
    needs_grad: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """``(grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scaling)``.

    ``needs_grad``: which of ``(h, w_down, b_down, w_up, b_up, scaling)`` to compute; the
    others are None. ``z``: the forward's fp32 ``[M, R]`` output (contiguous). ``b_up`` is
    read only for ``grad_scaling`` (``sum(grad_out * (act(z) W_up^T + b_up))``).

    ``grad_h [M, D]`` in h's dtype, contiguous: ``keep/(1-p) * (dz W_down)``, plus
    ``grad_out`` when ``residual_is_h`` (a separate residual's gradient is ``grad_out``
    itself; the op returns that). ``grad_w_down [R, D]``, ``grad_b_down [R]``,
    ``grad_w_up [D, R]``, ``grad_b_up [D]`` in the weights' dtype; ``grad_scaling`` a 0-d
    fp32 tensor. Here ``dz = scaling * (grad_out W_up) * act'(z)``.
    """
    raise NotImplementedError
