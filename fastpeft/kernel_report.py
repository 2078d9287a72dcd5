"""What the kernel checks (``fastpeft check``: Triton in ``fastpeft.check``, CUDA C++ in
``fastpeft.check_cuda``) judge compiled kernels by and report them as: the GPU targets
(``ARCHS``), one report row per kernel and target (``Result``), and the rules read from a
kernel's PTX: no kernel may synchronize GPU-wide (``forbidden_sync``) or use a global atomic
(``global_atomics``). Both checks import this module; neither imports the other's internals.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """A CUDA target: compute capability, ptxas architecture name and shared-memory limit."""

    capability: int
    ptxas_name: str
    # Most shared memory one block may use once it opts in (CUDA C++ Programming Guide,
    # "Technical Specifications per Compute Capability"); Triton refuses to launch above it.
    max_shared_bytes: int
    has_wgmma: bool


ARCHS: dict[str, Arch] = {
    # A100: 163 KB per block with opt-in (of 164 KB per SM).
    "sm_80": Arch(80, "sm_80", 163 * 1024, has_wgmma=False),
    # A10/RTX 30xx and L4/RTX 40xx: 99 KB per block with opt-in (of 100 KB per SM).
    "sm_86": Arch(86, "sm_86", 99 * 1024, has_wgmma=False),
    "sm_89": Arch(89, "sm_89", 99 * 1024, has_wgmma=False),
    # H100/H200: 227 KB per block with opt-in (of 228 KB per SM). Triton targets sm_90a, the
    # variant with the wgmma/TMA instructions, so ptxas must be asked for sm_90a as well.
    "sm_90": Arch(90, "sm_90a", 227 * 1024, has_wgmma=True),
}
DEFAULT_ARCHS = ("sm_80", "sm_90")


@dataclass
class Result:
    """One row of the report: one spec compiled for one arch."""

    kernel: str
    arch: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    wgmma: bool | None = None
    wgmma_shapes: str = ""  # distinct wgmma shapes in the PTX, e.g. "m64n128k16+m64n64k8"
    tma: bool | None = None  # TMA tensor loads (``cp.async.bulk.tensor``) in the PTX (None: not read)
    hmma: int | None = None  # HMMA (tensor-core) instructions in the SASS (CUDA C++ rows; None: not read)
    sync: str = ""  # forbidden fences / ordered atomics in the PTX (``forbidden_sync``), comma-separated
    atomics: str = ""  # global atomics in the PTX, relaxed included (``global_atomics``), comma-separated
    status: str = "FAIL"  # "ok" or "FAIL"
    reason: str = ""  # why it failed, one line
    detail: str = ""  # the compiler's full error message for a failure, if any

    @property
    def spill_bytes(self) -> int | None:
        """Spill stores plus spill loads, in bytes (None when ptxas did not run)."""
        if self.spill_stores is None or self.spill_loads is None:
            return None
        return self.spill_stores + self.spill_loads


# Memory-ordering qualifiers of atom/red/ld/st and fence semantics that make an instruction
# order memory (PTX ISA, "Memory Consistency Model"); relaxed (or none) does not.
_ORDERED_SEMANTICS = {"acquire", "release", "acq_rel", "sc", "seq_cst"}
# Scopes whose ordering costs a GPU-wide (or system-wide) barrier; .cta and .cluster do not.
_WIDE_SCOPES = {"gpu", "sys"}
# PTX opcode of an instruction line: after an optional guard predicate ("@%p1", "@!%p1").
_OPCODE_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)")


def _matching_opcodes(ptx: str, matches: Callable[[list[str], set[str]], bool]) -> list[str]:
    """The distinct opcodes of ``ptx``'s instructions for which ``matches(parts, qualifiers)``
    holds (``parts``: the opcode split at dots; ``qualifiers``: all but the first), in order of
    first use. An instruction's opcode follows an optional guard predicate; comments, labels
    and directives are no instructions."""
    found: dict[str, None] = {}
    for line in ptx.splitlines():
        match = _OPCODE_RE.match(line)
        if match:
            parts = match.group(1).split(".")
            if matches(parts, set(parts[1:])):
                found[match.group(1)] = None
    return list(found)


def _orders_gpu_wide(parts: list[str], qualifiers: set[str]) -> bool:
    """Whether an instruction orders memory at gpu or sys scope (``forbidden_sync``)."""
    head = parts[0]
    if head == "membar":
        return bool(qualifiers & {"gl", "sys"})
    if head == "fence":
        return len(parts) > 2 and parts[1] in _ORDERED_SEMANTICS and bool(qualifiers & _WIDE_SCOPES)
    if head in ("atom", "red", "ld", "st"):
        scopes = qualifiers & {"cta", "cluster", "gpu", "sys"}
        return bool(qualifiers & _ORDERED_SEMANTICS) and (not scopes or bool(scopes & _WIDE_SCOPES))
    return False


def forbidden_sync(ptx: str) -> list[str]:
    """GPU-scope synchronization in ``ptx``: the distinct offending opcodes, in order of first use.

    Forbidden: ``membar.gl`` / ``membar.sys``; ``fence.sc`` / ``fence.acq_rel`` (and
    acquire/release) at gpu or sys scope; atomics (``atom``, ``red``) and loads/stores with
    acquire/release/acq_rel semantics at gpu or sys scope (the default scope of an atomic
    is gpu). Each costs a GPU-wide memory barrier (``MEMBAR.ALL.GPU`` in SASS) or an L1
    invalidation per execution. Allowed here: relaxed atomics (which ``global_atomics``
    rejects on global memory: they are not reproducible), CTA / cluster scopes, ``bar.sync``,
    and the proxy and ``wgmma.fence`` fences of Hopper GEMMs (``fence.proxy.async``,
    ``fence.mbarrier_init``).
    """
    return _matching_opcodes(ptx, _orders_gpu_wide)


# State spaces of atom/red that stay inside a block or cluster; any other atom/red (.global, or
# generic addressing, which may reach global memory) is a global atomic.
_SHARED_SPACES = {"shared", "shared::cta", "shared::cluster"}


def _is_global_atomic(parts: list[str], qualifiers: set[str]) -> bool:
    """Whether an instruction is an atomic read-modify-write of global memory (``global_atomics``)."""
    head = parts[0]
    if head in ("atom", "red"):
        return not qualifiers & _SHARED_SPACES
    if head == "multimem":
        return parts[1:2] == ["red"]
    if head == "cp":  # bulk reductions: the destination's state space comes first, the source is shared
        return "reduce" in qualifiers and "global" in qualifiers
    return False


def global_atomics(ptx: str) -> list[str]:
    """Atomic read-modify-writes of global memory in ``ptx``: the distinct opcodes, in order of
    first use.

    Every ``atom`` / ``red`` not on shared memory (``.global``, or generic addressing, which may
    reach global memory), ``multimem.red``, and the bulk (TMA) reductions into global memory
    (``cp.reduce.async.bulk...global``), whatever their memory order: ``relaxed`` avoids the
    fence ``forbidden_sync`` rejects, but the order in which several programs' atomics land
    still varies run to run, so a float sum gathered that way is not bitwise reproducible.
    fastpeft documents every kernel (Triton and CUDA C++) as free of atomics, its reductions
    as fixed-order sums of partials, so ``fastpeft check`` fails a kernel with any of these.
    Shared-memory atomics stay inside one block and are not reported.
    """
    return _matching_opcodes(ptx, _is_global_atomic)


def atomics_problem(result: Result) -> str:
    """Why ``result``'s global atomics (``global_atomics``) fail it, naming the kernel."""
    return (f"{result.kernel} uses global atomics ({result.atomics}): fastpeft's kernels are documented as "
            "free of atomics (fixed-order reductions, bitwise reproducible), relaxed atomics included")
