"""``fastpeft check --cuda``: the static check of the CUDA C++ kernels in ``csrc/``.

Each ``csrc/*.cu`` is compiled for every requested architecture with
``nvcc -cubin -Xptxas -v`` (device code only: no host link, no GPU needed), with the flags of
the Release build (``-O3 -std=c++17``), and ptxas's report is parsed per kernel: registers,
stack frame, spill stores/loads, static shared memory; the PTX nvcc keeps on the way is read
per kernel for GPU-scope fences and ordered atomics (``fastpeft.kernel_report.forbidden_sync``, as for
the Triton kernels) and for global atomics (``global_atomics``: the kernels are documented as free
of atomics, bitwise reproducible). A kernel fails on a register spill (any spill byte), static
shared memory above the architecture's limit, a forbidden fence or ordered atomic, a global
atomic (relaxed included), or a compile error; and a kernel of ``TENSOR_CORE_KERNELS`` fails when it
compiles to no tensor-core instruction: the SASS (``cuobjdump -sass``, from the CUDA toolkit or
the one Triton bundles) is read for HMMA per kernel, or, without cuobjdump, the PTX for
``wmma.mma`` / ``mma.sync``. The rows share ``fastpeft.kernel_report.Result`` with the Triton section
and go into the same table and JSON report.

Skipped, with the reason in the report, when nvcc is absent (``$CUDACXX``, ``PATH`` and
``/usr/local/cuda/bin`` are searched) or when ``csrc/`` is not next to the package (an
installed wheel rather than a source checkout).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fastpeft.kernel_report import ARCHS, Result, atomics_problem, forbidden_sync, global_atomics

# Where the sources live in a source checkout (editable install or CI clone).
CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The Release build's device flags (CMake's CMAKE_CUDA_FLAGS_RELEASE plus the C++ standard).
NVCC_FLAGS = ("-std=c++17", "-O3", "-DNDEBUG")
# Kernels written for tensor cores (their name, found in the mangled one): the check fails
# one that compiles to no HMMA instruction (csrc/tensor_core.h), e.g. after a change that
# makes nvcc drop the wmma path.
TENSOR_CORE_KERNELS = frozenset({"bottleneck_forward_tc_kernel", "bottleneck_dz_dh_tc_kernel", "outer_partials_tc_kernel"})
# Where the CUDA toolkit installs nvcc when it is not on PATH.
_DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"


@dataclass
class CudaReport:
    """The CUDA C++ section: one Result per (kernel, arch), or why the section was skipped."""

    results: list[Result] = field(default_factory=list)
    skipped: str = ""  # the reason, when nothing was compiled
    nvcc: str = ""  # nvcc's path and release line


def find_nvcc() -> str | None:
    """nvcc from ``$CUDACXX``, ``PATH`` or ``/usr/local/cuda/bin``, or None."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), _DEFAULT_NVCC):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_cuobjdump(nvcc: str) -> str | None:
    """cuobjdump next to nvcc, on ``PATH``, or bundled with Triton (``triton/backends/nvidia/bin``), or None."""
    candidates = [str(Path(nvcc).with_name("cuobjdump")), shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


_SASS_FUNCTION_RE = re.compile(r"^\s*Function : (\S+)", re.MULTILINE)
_HMMA_RE = re.compile(r"\bHMMA\.")
_PTX_MMA_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:wmma\.mma|mma\.sync)\b", re.MULTILINE)


def sass_hmma_counts(sass: str) -> dict[str, int]:
    """HMMA instructions per function of ``cuobjdump -sass`` output, by mangled name."""
    starts = [(m.end(), m.group(1)) for m in _SASS_FUNCTION_RE.finditer(sass)]
    ends = [m.start() for m in _SASS_FUNCTION_RE.finditer(sass)][1:] + [len(sass)]
    return {name: len(_HMMA_RE.findall(sass[start:end])) for (start, name), end in zip(starts, ends)}


def ptx_mma_count(ptx: str) -> int:
    """``wmma.mma`` / ``mma.sync`` instructions in a kernel's PTX (tensor-core products)."""
    return len(_PTX_MMA_RE.findall(ptx))


def cuda_sources(csrc: Path = CSRC) -> list[Path]:
    """The ``.cu`` files of ``csrc`` (empty when there is no such folder)."""
    return sorted(csrc.glob("*.cu")) if csrc.is_dir() else []


@dataclass(frozen=True)
class KernelStats:
    """What ``ptxas -v`` reports for one function."""

    registers: int | None = None
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0
    entry: bool = False  # a __global__ kernel (else a non-inlined device function)


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas_verbose(output: str) -> dict[str, KernelStats]:
    """Per-function statistics from ``nvcc -Xptxas -v`` output, by mangled name, in order.

    ptxas prints, per function, ``Compiling entry function 'NAME'`` (kernels only), then
    ``Function properties for NAME`` with the stack frame and spill line, then ``Used N
    registers ... M bytes smem`` for the entry being compiled."""
    stats: dict[str, dict] = {}
    entry = props = None
    for line in output.splitlines():
        if m := _ENTRY_RE.search(line):
            entry = m.group(1)
            stats.setdefault(entry, {})["entry"] = True
        elif m := _PROPS_RE.search(line):
            props = m.group(1)
            stats.setdefault(props, {})
        elif (m := _FRAME_RE.search(line)) and props is not None:
            stats[props].update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif (m := _USED_RE.search(line)) and entry is not None:
            stats[entry].update(registers=int(m[1]), shared_bytes=int(m[2] or 0))
    return {name: KernelStats(**values) for name, values in stats.items()}


def _demangle(names: Sequence[str]) -> dict[str, str]:
    """Readable kernel names (``bottleneck_forward_kernel<__half, float>``): c++filt's output
    without the return type, namespaces and parameter list; the mangled name without c++filt."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    proc = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    readable = {}
    for name, line in zip(names, lines):
        head = line.replace("(anonymous namespace)::", "").split("(", 1)[0].removeprefix("void ")
        readable[name] = re.sub(r"\b\w+::", "", head)
    return readable


_PTX_ENTRY_RE = re.compile(r"^(?:\.visible\s+)?\.entry\s+(\S+?)\(", re.MULTILINE)


def ptx_entries(ptx: str) -> dict[str, str]:
    """Each kernel's PTX (from its ``.entry`` line to the next), by mangled name."""
    starts = [(m.start(), m.group(1)) for m in _PTX_ENTRY_RE.finditer(ptx)]
    ends = [start for start, _ in starts[1:]] + [len(ptx)]
    return {name: ptx[start:end] for (start, name), end in zip(starts, ends)}


def _judge(row: Result, limit: int) -> Result:
    problems = []
    if row.spill_bytes:
        problems.append(f"register spills ({row.spill_stores} B stores, {row.spill_loads} B loads at {row.registers} registers)")
    if row.shared_bytes and row.shared_bytes > limit:
        problems.append(f"static shared memory {row.shared_bytes} B > {limit} B limit")
    if row.sync:
        problems.append(f"GPU-scope fence or ordered atomic ({row.sync})")
    if row.atomics:
        problems.append(atomics_problem(row))
    row.status, row.reason = ("FAIL", "; ".join(problems)) if problems else ("ok", "")
    return row


def compile_source(nvcc: str, source: Path, arch: str) -> list[Result]:
    """Compile ``source`` for ``arch`` (cubin only, keeping the PTX) and judge every function
    ptxas reports."""
    capability = ARCHS[arch].capability
    with tempfile.TemporaryDirectory(prefix="fastpeft-check-cuda-") as tmp:
        cmd = [nvcc, *NVCC_FLAGS, "-cubin", f"-arch=sm_{capability}", "-Xptxas", "-v", "-keep", "-keep-dir", tmp,
               "-I", str(source.parent), str(source), "-o", str(Path(tmp) / "out.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        entries = {name: text for ptx in Path(tmp).glob("*.ptx") for name, text in ptx_entries(ptx.read_text()).items()}
        cuobjdump = find_cuobjdump(nvcc) if proc.returncode == 0 else None
        sass = subprocess.run([cuobjdump, "-sass", str(Path(tmp) / "out.cubin")], capture_output=True,
                              text=True) if cuobjdump else None
    hmma = sass_hmma_counts(sass.stdout) if sass is not None and sass.returncode == 0 else None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return [Result(source.name, arch, reason="nvcc compile error", detail=f"$ {' '.join(cmd)}\n{output}")]
    stats = parse_ptxas_verbose(output)
    if not stats:
        return [Result(source.name, arch, reason="no ptxas -v statistics in nvcc's output", detail=output)]
    names = _demangle(list(stats))
    limit = ARCHS[arch].max_shared_bytes
    rows = []
    for name, s in stats.items():
        row = Result(f"{source.name}:{names[name]}", arch, registers=s.registers, spill_stores=s.spill_stores,
                     spill_loads=s.spill_loads, shared_bytes=s.shared_bytes,
                     sync=", ".join(forbidden_sync(entries.get(name, ""))),
                     atomics=", ".join(global_atomics(entries.get(name, ""))))
        if hmma is not None and s.entry:
            row.hmma = hmma.get(name, 0)
        row = _judge(row, limit)
        if any(kernel in name for kernel in TENSOR_CORE_KERNELS):  # in the mangled name too
            mma = row.hmma if row.hmma is not None else ptx_mma_count(entries.get(name, ""))
            if not mma:
                what = "HMMA in its SASS" if row.hmma is not None else "wmma.mma / mma.sync in its PTX (no cuobjdump)"
                row.status, row.reason = "FAIL", "; ".join(filter(None, [row.reason, f"written for tensor cores but no {what}"]))
        if s.entry and name not in entries:  # the fence check would have read nothing
            row.status, row.reason = "FAIL", "; ".join(filter(None, [row.reason, "no PTX found for this kernel"]))
        rows.append(row)
    return rows


def nvcc_version(nvcc: str) -> str:
    """nvcc's release line (``Cuda compilation tools, release 13.0, V13.0.88``)."""
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if "release" in line]
    return lines[-1].strip() if lines else proc.stdout.strip()


def run(archs: Sequence[str], jobs: int, csrc: Path = CSRC) -> CudaReport:
    """Compile every ``csrc/*.cu`` for every arch with up to ``jobs`` nvcc processes."""
    nvcc = find_nvcc()
    if nvcc is None:
        return CudaReport(skipped="nvcc not found ($CUDACXX, PATH, /usr/local/cuda/bin): CUDA C++ kernels not checked")
    sources = cuda_sources(csrc)
    if not sources:
        return CudaReport(skipped=f"no CUDA sources in {csrc} (not a source checkout?): CUDA C++ kernels not checked")
    pairs = [(source, arch) for source in sources for arch in archs]
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(pairs)))) as pool:
        rows = [row for rows in pool.map(lambda p: compile_source(nvcc, *p), pairs) for row in rows]
    return CudaReport(results=rows, nvcc=f"{nvcc} ({nvcc_version(nvcc)})")
