"""The ops ``fastpeft tune`` validates and times, each as the same five functions (its module:
``fastpeft.tune.lora``, ``.bottleneck``, ``.multi_lora``), which ``fastpeft.tune.run`` drives
through one loop of "validate, time, choose"."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastpeft.tune import bottleneck, lora, multi_lora
from fastpeft.tune.checks import Build, Problem, Validation
from fastpeft.tune.shapes import Grid


@dataclass(frozen=True)
class OpTuner:
    """One op: ``implementations(device)`` (what ``auto`` may choose there, the torch path
    included), ``cases(grid)`` (the timed problems, in the order they run), ``odd_problems(grid)``
    (validated first), ``validate(implementation, problem, device, generator)``,
    ``timed_steps(problem, implementations, device, generator, peer)`` (a build per
    implementation, then the peer's when ``peer`` and the op has one: ``has_peer``) and
    ``runs_here(implementation, problem)`` (whether the implementation covers the problem)."""

    op: str
    implementations: Callable[[torch.device], tuple[str, ...]]
    cases: Callable[[Grid], list[Problem]]
    odd_problems: Callable[[Grid], tuple[Problem, ...]]
    validate: Callable[[str, Problem, torch.device, torch.Generator], Validation]
    timed_steps: Callable[[Problem, Sequence[str], torch.device, torch.Generator, bool], list[Build]]
    runs_here: Callable[[str, Problem], bool]
    has_peer: bool = False


def _tuner(module, has_peer: bool = False) -> OpTuner:
    return OpTuner(module.OP, module.implementations, module.cases, module.odd_problems, module.validate,
                   module.timed_steps, module.runs_here, has_peer)


# HF PEFT's lora.Linear is timed beside the LoRA op (the layer users replace).
TUNERS: dict[str, OpTuner] = {t.op: t for t in (_tuner(lora, has_peer=True), _tuner(bottleneck), _tuner(multi_lora))}
