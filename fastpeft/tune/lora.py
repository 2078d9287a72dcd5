"""One implementation of the LoRA linear op at one problem, checked against float64 on this
machine's device: what ``fastpeft tune`` trusts before it times anything.

A check runs the op's forward and backward twice on the same inputs and seed, with the
implementation forced (``running``), and asks of it:

- that the implementation asked for is the one the op ran (a problem the kernels refuse
  would silently validate the torch path);
- the output and every gradient (y, dx, dA, dB) against ``lora_linear_ref`` in float64 with
  the same dropout mask: the norm-wise relative error within ``numerics.TOLERANCE`` and every
  element within ``numerics.ELEMENT_TOLERANCE`` of its magnitude bound, for the activation
  dtype (the tests' table); the largest per-row relative error is reported;
- with dropout, the mask of the kernel paths is the reference Philox mask (the reference run
  uses ``keep_mask_philox``, so a kernel drawing other bits fails the comparison), and the
  compiled mask kernel's bits equal it;
- the two runs bitwise equal (the kernels use no atomics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastpeft.bench.cases import LayerShape
from fastpeft.bench.forced import forced_backend, forced_env
from fastpeft.bench.implementations import random_weights
from fastpeft.kernels.dropout_mask import keep_mask_philox
from fastpeft.kernels.lora import dispatch
from fastpeft.kernels.lora.configs import TMA_ENV
from fastpeft.kernels.lora.ref import lora_linear_ref
from fastpeft.tune.numerics import TOLERANCE, element_violations, magnitudes, max_row_error, relative_error

# The LoRA implementations and the settings that force each: FASTPEFT_BACKEND and
# FASTPEFT_LORA_TMA.
LORA_SETTINGS: dict[str, tuple[str, str]] = {
    dispatch.TORCH: ("torch", "0"),
    dispatch.FUSED: ("triton", "0"),
    dispatch.FUSED_TMA: ("triton", "1"),
    dispatch.HYBRID: ("hybrid", "0"),
}


@dataclass(frozen=True)
class LoRACase:
    """x ``[m, k]`` in ``dtype`` through W ``[n, k]`` with rank-``r`` adapters in
    ``adapter_dtype``, dropout ``dropout_p`` on the LoRA branch (a training step's)."""

    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    dropout_p: float


@dataclass(frozen=True)
class Validation:
    """The outcome of a check: the largest per-row relative error over y and the gradients,
    whether every check passed, and what failed."""

    max_rel_error: float
    passed: bool
    problems: tuple[str, ...]


@contextlib.contextmanager
def running(implementation: str) -> Iterator[None]:
    """The LoRA op forced to ``implementation`` (one of ``LORA_SETTINGS``) for the block."""
    choice, tma = LORA_SETTINGS[implementation]
    with forced_backend(choice), forced_env(TMA_ENV, tma):
        yield


def _expected_dispatch(implementation: str) -> str:
    """What ``dispatch.choose_implementation`` says when ``implementation`` runs: fused-tma is
    the fused path with the TMA variable set."""
    return dispatch.FUSED if implementation == dispatch.FUSED_TMA else implementation


def validate_lora(implementation: str, case: LoRACase, device: torch.device, generator: torch.Generator,
                  scaling: float = 2.0) -> Validation:
    """Check ``implementation`` on ``case`` on ``device`` (module docstring), inputs drawn from
    ``generator``."""
    w = random_weights(LayerShape("tune", case.k, case.n), case.r, case.dtype, device, generator, case.adapter_dtype)
    x = torch.randn(case.m, case.k, generator=generator, device=device, dtype=torch.float32).to(case.dtype)
    dy = torch.randn(case.m, case.n, generator=generator, device=device, dtype=torch.float32).to(case.dtype)
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
    with running(implementation):
        ran = dispatch.choose_implementation(x, w.weight, w.lora_a, True, case.dropout_p > 0)
    if ran != _expected_dispatch(implementation):
        return Validation(float("inf"), False, (f"the op runs {ran} for this problem, not {implementation}",))

    def run() -> tuple[torch.Tensor, ...]:
        xs, a, b = (t.detach().clone().requires_grad_() for t in (x, w.lora_a, w.lora_b))
        with running(implementation):
            y, _, keep = torch.ops.fastpeft.lora_linear(xs, w.weight, w.bias, a, b, scaling, case.dropout_p, seed,
                                                        True)
            y.backward(dy)
        return y.detach(), xs.grad, a.grad, b.grad, keep

    first, second = run(), run()
    problems = []
    if not all(torch.equal(u, v) for u, v in zip(first[:4], second[:4])):
        problems.append("two runs on the same inputs and seed differ (not bitwise reproducible)")
    mask = None
    if case.dropout_p > 0:
        # The reference Philox in torch ops, on the device (one pass of int64 ops: milliseconds
        # on a GPU, where the CPU would take seconds at M = 4096, K = 14336).
        reference_mask = keep_mask_philox(seed, case.m, case.k, case.dropout_p)
        keep = first[4]
        mask = keep.reshape(case.m, case.k) if keep.numel() else reference_mask
        if implementation != dispatch.TORCH:
            problems += _mask_kernel_problems(seed, case, reference_mask)
    inputs = [x, w.weight, w.bias, w.lora_a, w.lora_b]
    leaves = [t.detach().double().requires_grad_() if i in (0, 3, 4) else t.double() for i, t in enumerate(inputs)]
    y64 = lora_linear_ref(*leaves, scaling, case.dropout_p, dropout_mask=mask)
    y64.backward(dy.double())
    y_bound, bounds = magnitudes(lambda *t: lora_linear_ref(*t, abs(scaling), case.dropout_p, dropout_mask=mask),
                                 inputs, dy)
    worst = 0.0
    checks = (("y", first[0], y64, y_bound), ("dx", first[1], leaves[0].grad, bounds[0]),
              ("dA", first[2], leaves[3].grad, bounds[3]), ("dB", first[3], leaves[4].grad, bounds[4]))
    for name, got, want, bound in checks:
        worst = max(worst, max_row_error(got, want))
        err = relative_error(got, want)
        if err > TOLERANCE[case.dtype]:
            problems.append(f"{name}: relative error {err:.3e} > {TOLERANCE[case.dtype]:.1e}")
        count, where = element_violations(got, want, bound, case.dtype)
        if count:
            problems.append(f"{name}: {count} element(s) beyond their magnitude bound; {where}")
    return Validation(worst, not problems, tuple(problems))


def _mask_kernel_problems(seed: torch.Tensor, case: LoRACase, reference: torch.Tensor) -> list[str]:
    """The compiled mask kernel's bits for ``seed`` against the reference Philox mask."""
    from fastpeft.kernels.lora.launch import dropout_keep_mask

    drawn = dropout_keep_mask(seed, case.m, case.k, case.dropout_p)
    if torch.equal(drawn.to(reference.device), reference):
        return []
    return [f"the mask kernel drew {int((drawn.cpu() != reference.cpu()).sum())} bit(s) other than the reference "
            "Philox mask"]
