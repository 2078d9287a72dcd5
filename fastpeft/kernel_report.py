"""What the kernel checks (``fastpeft check``: Triton in ``fastpeft.check``, CUDA C++ in
``fastpeft.check_cuda``) judge compiled kernels by and report them as: the GPU targets
(``ARCHS``), one report row per kernel and target (``Result``), and the rules read from a
kernel's PTX: no kernel may synchronize GPU-wide (``forbidden_sync``) or use a global atomic
(``global_atomics``). Both checks import this module; neither imports the other's internals.
"""

from __future__ import annotations

import re
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


def forbidden_sync(ptx: str) -> list[str]:
    """GPU-scope synchronization in ``ptx``: the distinct offending opcodes, in order of first use.

    Forbidden: ``membar.gl`` / ``membar.sys``; ``fence.sc`` / ``fence.acq_rel`` (and
    acquire/release) at gpu or sys scope; atomics (``atom``, ``red``) and loads/stores with
    acquire/release/acq_rel semantics at gpu or sys scope (the default scope of an atomic
    is gpu). Each costs a GPU-wide memory barrier (``MEMBAR.ALL.GPU`` in SASS) or an L1
    invalidation per execution; reductions want ``sem="relaxed"`` (``red.relaxed``) or no
    atomics at all. Allowed:
    relaxed atomics, CTA / cluster scopes, ``bar.sync``, and the proxy and ``wgmma.fence``
    fences of Hopper GEMMs (``fence.proxy.async``, ``fence.mbarrier_init``).
    """
    found: dict[str, None] = {}
    for line in ptx.splitlines():
        match = _OPCODE_RE.match(line)
        if not match:
            continue
        opcode = match.group(1)
        parts = opcode.split(".")
        head, qualifiers = parts[0], set(parts[1:])
        if head == "membar":
            wide = bool(qualifiers & {"gl", "sys"})
        elif head == "fence":
            wide = len(parts) > 2 and parts[1] in _ORDERED_SEMANTICS and bool(qualifiers & _WIDE_SCOPES)
        elif head in ("atom", "red", "ld", "st"):
            scopes = qualifiers & {"cta", "cluster", "gpu", "sys"}
            wide = bool(qualifiers & _ORDERED_SEMANTICS) and (not scopes or bool(scopes & _WIDE_SCOPES))
        else:
            wide = False
        if wide:
            found[opcode] = None
    return list(found)


# State spaces of atom/red that stay inside a block or cluster; any other atom/red (.global, or
# generic addressing, which may reach global memory) is a global atomic.
_SHARED_SPACES = {"shared", "shared::cta", "shared::cluster"}


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
    found: dict[str, None] = {}
    for line in ptx.splitlines():
        match = _OPCODE_RE.match(line)
        if not match:
            continue
        opcode = match.group(1)
        parts = opcode.split(".")
        head, qualifiers = parts[0], set(parts[1:])
        if head in ("atom", "red"):
            atomic = not qualifiers & _SHARED_SPACES
        elif head == "multimem":
            atomic = parts[1:2] == ["red"]
        elif head == "cp":
            atomic = "reduce" in qualifiers and "global" in qualifiers  # the destination; the source is shared
        else:
            atomic = False
        if atomic:
            found[opcode] = None
    return list(found)


def atomics_problem(result: Result) -> str:
    """Why ``result``'s global atomics (``global_atomics``) fail it, naming the kernel."""
    return (f"{result.kernel} uses global atomics ({result.atomics}): fastpeft's kernels are documented as "
            "free of atomics (fixed-order reductions, bitwise reproducible), relaxed atomics included")
