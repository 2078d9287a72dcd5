"""What every op's validation in ``fastpeft tune`` shares: the problem checked or timed, the
outcome of a check, and the comparison of an implementation's outputs with float64.

A check (``fastpeft.tune.lora``, ``.bottleneck``, ``.multi_lora``) runs the op twice with the
implementation forced and compares, for each output and gradient (``compare``):

- the norm-wise relative error against the float64 reference, within ``numerics.TOLERANCE``
  for the activation dtype (the tests' table);
- every element within ``numerics.ELEMENT_TOLERANCE`` of its magnitude bound (the sum of the
  absolute values of the products its dot products add): one wrong element among thousands
  fails, where a norm would hide it;
- the largest per-row relative error, which the table records (``max_rel_error``);

and that the two runs are bitwise equal (``reproducible``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastpeft.tune.numerics import TOLERANCE, element_violations, max_row_error, relative_error

# The implementations of the bottleneck adapter and multi-LoRA (FASTPEFT_BACKEND's names).
TORCH, TRITON, CUDA = "torch", "triton", "cuda"
# The odd shapes' dropout: none and a large one (more dropped elements to get wrong).
ODD_DROPOUTS = (0.0, 0.1)
# What an op's ``timed_steps`` returns per implementation: a function building the step timed.
Build = Callable[[], Callable[[], object]]


@dataclass(frozen=True)
class Problem:
    """One call of ``op`` to check or time: M rows, K -> N and r (LoRA: the layer and rank; the
    bottleneck adapter: K = N = D and r = R; multi-LoRA: the layer and the slots' rank R_MAX),
    in ``mode`` (``fastpeft.kernels.tuned_table.MODES``), activations in ``dtype`` and adapter
    weights in ``adapter_dtype``, dropout ``dropout_p`` (a training step's, 0 in inference),
    ``activation`` (the bottleneck adapter's), ``layer`` the layer's name in the log."""

    op: str
    mode: str
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    dropout_p: float = 0.0
    activation: str = "relu"
    layer: str = ""

    def describe(self) -> str:
        """The problem in one line of the log or a failure."""
        if self.op == "bottleneck":
            shape = f"M={self.m} D={self.k} R={self.r} {self.activation}"
        else:
            shape = f"M={self.m} K={self.k} N={self.n} r={self.r}"
        adapters = "" if self.adapter_dtype == torch.float32 else f" {str(self.adapter_dtype).removeprefix('torch.')} adapter"
        return f"{self.op} {shape} dropout={self.dropout_p}{adapters}"


@dataclass(frozen=True)
class Validation:
    """The outcome of a check: the largest per-row relative error over the outputs and
    gradients, whether every check passed, and what failed."""

    max_rel_error: float
    passed: bool
    problems: tuple[str, ...]


def compare(outputs: Sequence[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]],
            dtype: torch.dtype) -> tuple[float, list[str]]:
    """``(worst per-row error, problems)`` over ``(name, got, float64 expected, magnitude
    bound)`` per output, with the tolerances of activation ``dtype`` (module docstring)."""
    worst, problems = 0.0, []
    for name, got, want, bound in outputs:
        worst = max(worst, max_row_error(got, want))
        err = relative_error(got, want)
        if err > TOLERANCE[dtype]:
            problems.append(f"{name}: relative error {err:.3e} > {TOLERANCE[dtype]:.1e}")
        count, where = element_violations(got, want, bound, dtype)
        if count:
            problems.append(f"{name}: {count} element(s) beyond their magnitude bound; {where}")
    return worst, problems


def reproducible(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> list[str]:
    """A problem when two runs on the same inputs and seed differ in any bit (the kernels use
    no atomics)."""
    if all(torch.equal(u, v) for u, v in zip(first, second)):
        return []
    return ["two runs on the same inputs and seed differ (not bitwise reproducible)"]


def ran_other_path(ran: str, implementation: str) -> Validation | None:
    """The failed validation of an implementation the op does not run for the problem (a
    problem the kernels refuse would silently validate the torch path), else None."""
    if ran == implementation:
        return None
    return Validation(float("inf"), False, (f"the op runs {ran} for this problem, not {implementation}",))


def checked(validate: Callable[[str, Problem, torch.device, torch.Generator], Validation], implementation: str,
            problem: Problem, device: torch.device, generator: torch.Generator) -> Validation:
    """``validate(...)``, with an exception it raised (a kernel that does not compile or
    launch on this GPU) a failed check that says so: one broken implementation must not stop
    the others."""
    try:
        return validate(implementation, problem, device, generator)
    except Exception as exc:  # any failure of the implementation is its result
        return Validation(float("inf"), False, (f"raised {type(exc).__name__}: {exc}",))


def triton_and_cuda(device: torch.device) -> tuple[str, ...]:
    """The torch path and the Triton kernels, and on a GPU the CUDA C++ kernels when the
    extension is built and runs there (what ``auto`` may choose for the bottleneck adapter and
    multi-LoRA)."""
    impls = [TORCH, TRITON]
    if device.type == "cuda":
        from fastpeft import cuda_ext

        try:
            cuda_ext.load()
            impls.append(CUDA)
        except RuntimeError:  # not built, or cannot run on this device: nothing to tune
            pass
    return tuple(impls)


def randn(generator: torch.Generator, device: torch.device, dtype: torch.dtype, *size: int,
          scale: float = 1.0) -> torch.Tensor:
    """A standard normal ``[*size]`` tensor times ``scale``, drawn in fp32 from ``generator`` and
    rounded to ``dtype``."""
    return (torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)


def draw_seed(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A dropout seed (the ops' 1-element int64 tensor) from ``generator``."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
