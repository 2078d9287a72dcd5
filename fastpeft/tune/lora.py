"""The LoRA linear op in ``fastpeft tune``: its implementations, the check of one of them at
one problem against float64 on this machine's device, the steps timed, and the cases.

A check (``validate``) runs the op's forward and backward twice on the same inputs and seed,
with the implementation forced (``running``), and asks of it (``fastpeft.tune.checks``):

- that the implementation asked for is the one the op ran;
- the output and every gradient (y, dx, dA, dB) against ``lora_linear_ref`` in float64 with
  the same dropout mask, norm-wise and element-wise; the largest per-row relative error is
  reported;
- with dropout, the mask of the kernel paths is the reference Philox mask (the reference run
  uses ``keep_mask_philox``, so a kernel drawing other bits fails the comparison), and the
  compiled mask kernel's bits equal it;
- the two runs bitwise equal.

Timed: a training step (forward and backward) at the training row counts without dropout
(PEFT's default) and with it, and an inference forward at every row count, per layer shape and
rank; HF PEFT's ``lora.Linear`` beside them when installed (the reference users compare with).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from fastpeft.bench.cases import FORWARD, FORWARD_BACKWARD, LayerShape
from fastpeft.bench.forced import forced_backend, forced_env
from fastpeft.bench.implementations import PEFT, build_fastpeft_op, build_implementation, random_weights
from fastpeft.bench.runner import make_step
from fastpeft.kernels.dropout_mask import keep_mask_philox
from fastpeft.kernels.lora import dispatch
from fastpeft.kernels.lora.configs import MEDIUM_MAX_M, TMA_ENV, device_info
from fastpeft.kernels.lora.ref import lora_linear_ref
from fastpeft.kernels.tuned_table import INFERENCE, TRAINING, TRAINING_DROPOUT
from fastpeft.tune.checks import (
    ODD_DROPOUTS,
    Build,
    Problem,
    Validation,
    compare,
    draw_seed,
    ran_other_path,
    randn,
    reproducible,
)
from fastpeft.tune.numerics import magnitudes
from fastpeft.tune.shapes import Grid

OP = "lora"
# The LoRA implementations and the settings that force each: FASTPEFT_BACKEND and
# FASTPEFT_LORA_TMA.
LORA_SETTINGS: dict[str, tuple[str, str]] = {
    dispatch.TORCH: ("torch", "0"),
    dispatch.FUSED: ("triton", "0"),
    dispatch.FUSED_TMA: ("triton", "1"),
    dispatch.HYBRID: ("hybrid", "0"),
}
# The scaling of every check (lora_alpha / r = 2, PEFT's common alpha = 2r).
SCALING = 2.0
# Odd shapes on a GPU: partial tiles in every dimension at decode, medium and large M (the
# kernels need K and N multiples of 16): 2064 = 16 x 129, 1040 = 16 x 65; the rehearsal's are
# tiny (the interpreter runs one program at a time).
ODD_SHAPES = ((1, 2064, 1040, 16), (33, 1040, 2064, 64), (4100, 2064, 1040, 16))
TINY_ODD_SHAPES = ((5, 48, 80, 8), (17, 80, 48, 4))


@contextlib.contextmanager
def running(implementation: str) -> Iterator[None]:
    """The LoRA op forced to ``implementation`` (one of ``LORA_SETTINGS``) for the block."""
    choice, tma = LORA_SETTINGS[implementation]
    with forced_backend(choice), forced_env(TMA_ENV, tma):
        yield


def implementations(device: torch.device) -> tuple[str, ...]:
    """What ``auto`` may choose for the LoRA op on ``device``: the torch path, the fused and
    hybrid kernels, and on an sm_90 GPU the fused kernels with the TMA forward."""
    impls = [dispatch.TORCH, dispatch.FUSED, dispatch.HYBRID]
    if device.type == "cuda" and device_info(device)[1] == 90:
        impls.insert(2, dispatch.FUSED_TMA)
    return tuple(impls)


def runs_here(implementation: str, problem: Problem) -> bool:
    """fused-tma differs from fused only above the medium tiles (its kernel's M range)."""
    return implementation != dispatch.FUSED_TMA or problem.m > MEDIUM_MAX_M


def _problem(grid: Grid, mode: str, m: int, shape: LayerShape, r: int) -> Problem:
    dropout = grid.dropout_p if mode == TRAINING_DROPOUT else 0.0
    return Problem(OP, mode, m, shape.in_features, shape.out_features, r, grid.dtype, grid.adapter_dtype, dropout,
                   layer=shape.name)


def cases(grid: Grid) -> list[Problem]:
    """The timed cases in the order they run: training steps first (where a fine-tuning run
    spends its time; without dropout, PEFT's default, then with), then inference forwards from
    decode up."""
    planned = [_problem(grid, mode, m, s, r) for mode in (TRAINING, TRAINING_DROPOUT) for m in grid.train_ms
               for s in grid.layers for r in grid.ranks]
    planned += [_problem(grid, INFERENCE, m, s, r) for m in (*grid.decode_ms, *grid.train_ms) for s in grid.layers
                for r in grid.ranks]
    return planned


def odd_problems(grid: Grid) -> tuple[Problem, ...]:
    """The odd shapes validated before anything is timed, as training steps (every gradient),
    with both adapter dtypes (``Grid.odd_adapter_dtypes``)."""
    shapes = TINY_ODD_SHAPES if grid.tiny else ODD_SHAPES
    return tuple(Problem(OP, TRAINING_DROPOUT if p else TRAINING, m, k, n, r, grid.dtype, adapter_dtype, p)
                 for adapter_dtype in grid.odd_adapter_dtypes for m, k, n, r in shapes for p in ODD_DROPOUTS)


def _expected_dispatch(implementation: str) -> str:
    """What ``dispatch.choose_implementation`` says when ``implementation`` runs: fused-tma is
    the fused path with the TMA variable set."""
    return dispatch.FUSED if implementation == dispatch.FUSED_TMA else implementation


def validate(implementation: str, problem: Problem, device: torch.device, generator: torch.Generator) -> Validation:
    """Check ``implementation`` on ``problem`` on ``device`` (module docstring), inputs drawn
    from ``generator``."""
    p = problem
    w = random_weights(LayerShape("tune", p.k, p.n), p.r, p.dtype, device, generator, p.adapter_dtype)
    x = randn(generator, device, p.dtype, p.m, p.k)
    dy = randn(generator, device, p.dtype, p.m, p.n)
    seed = draw_seed(generator, device)
    with running(implementation):
        ran = dispatch.choose_implementation(x, w.weight, w.lora_a, True, p.dropout_p > 0)
    other = ran_other_path(ran, _expected_dispatch(implementation))
    if other is not None:
        return other

    def run() -> tuple[torch.Tensor, ...]:
        xs, a, b = (t.detach().clone().requires_grad_() for t in (x, w.lora_a, w.lora_b))
        with running(implementation):
            y, _, keep = torch.ops.fastpeft.lora_linear(xs, w.weight, w.bias, a, b, SCALING, p.dropout_p, seed, True)
            y.backward(dy)
        return y.detach(), xs.grad, a.grad, b.grad, keep

    first, second = run(), run()
    problems = reproducible(first[:4], second[:4])
    mask = None
    if p.dropout_p > 0:
        # The reference Philox in torch ops, on the device (one pass of int64 ops: milliseconds
        # on a GPU, where the CPU would take seconds at M = 4096, K = 14336).
        reference_mask = keep_mask_philox(seed, p.m, p.k, p.dropout_p)
        keep = first[4]
        mask = keep.reshape(p.m, p.k) if keep.numel() else reference_mask
        if implementation != dispatch.TORCH:
            problems += _mask_kernel_problems(seed, p, reference_mask)
    inputs = [x, w.weight, w.bias, w.lora_a, w.lora_b]
    leaves = [t.detach().double().requires_grad_() if i in (0, 3, 4) else t.double() for i, t in enumerate(inputs)]
    y64 = lora_linear_ref(*leaves, SCALING, p.dropout_p, dropout_mask=mask)
    y64.backward(dy.double())
    y_bound, bounds = magnitudes(lambda *t: lora_linear_ref(*t, SCALING, p.dropout_p, dropout_mask=mask), inputs, dy)
    worst, wrong = compare((("y", first[0], y64, y_bound), ("dx", first[1], leaves[0].grad, bounds[0]),
                            ("dA", first[2], leaves[3].grad, bounds[3]), ("dB", first[3], leaves[4].grad, bounds[4])),
                           p.dtype)
    problems += wrong
    return Validation(worst, not problems, tuple(problems))


def _mask_kernel_problems(seed: torch.Tensor, problem: Problem, reference: torch.Tensor) -> list[str]:
    """The compiled mask kernel's bits for ``seed`` against the reference Philox mask."""
    from fastpeft.kernels.lora.launch import dropout_keep_mask

    drawn = dropout_keep_mask(seed, problem.m, problem.k, problem.dropout_p)
    if torch.equal(drawn.to(reference.device), reference):
        return []
    return [f"the mask kernel drew {int((drawn.cpu() != reference.cpu()).sum())} bit(s) other than the reference "
            "Philox mask"]



def timed_steps(problem: Problem, implementations: Sequence[str], device: torch.device, generator: torch.Generator,
                peer: bool) -> list[Build]:
    """The steps timed side by side for ``problem``: each implementation's (a training step, or
    an inference forward), then with ``peer`` HF PEFT's layer's on the same inputs."""
    p = problem
    training = p.mode != INFERENCE
    mode = FORWARD_BACKWARD if training else FORWARD
    w = random_weights(LayerShape(p.layer, p.k, p.n), p.r, p.dtype, device, generator, p.adapter_dtype)
    x = randn(generator, device, p.dtype, p.m, p.k).requires_grad_(training)
    dy = randn(generator, device, p.dtype, p.m, p.n)

    def build(implementation: str) -> Build:
        def make() -> Callable[[], object]:
            step = make_step(build_fastpeft_op(w, p.dropout_p, training), x, dy, mode)

            def forced() -> object:
                with running(implementation):
                    return step()

            return forced

        return make

    def build_peft() -> Callable[[], object]:
        return make_step(build_implementation(PEFT, w, p.dropout_p, training), x, dy, mode)

    return [build(i) for i in implementations] + ([build_peft] if peer else [])
