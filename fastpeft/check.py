"""``fastpeft check``: compile every Triton kernel configuration for real GPUs, without a GPU.

For each :class:`~fastpeft.kernels.aot_spec.KernelSpec` returned by
``fastpeft.kernels.all_kernel_specs()`` and each requested architecture, Triton compiles the
kernel to PTX (``triton.compile`` with an explicit ``GPUTarget``, which needs no driver), then
``ptxas -v`` from Triton's wheel reports registers and spills. A configuration fails on a compile
error, any register spill, shared memory above the architecture's per-block limit, a GPU-scope
memory fence or ordered atomic in its PTX (``forbidden_sync``: ``tl.atomic_add``'s default
``sem="acq_rel"`` becomes ``MEMBAR.ALL.GPU`` + atomic + L1 invalidate in SASS, at every call),
any global atomic in its PTX, relaxed included (``global_atomics``: every fastpeft kernel is
documented as free of atomics and bitwise reproducible, its reductions as fixed-order sums of
partials, and atomics landing in a varying order break that), or (sm_90) a spec that expects
wgmma, or TMA loads (``expects_tma_on_sm90``: ``cp.async.bulk.tensor``, ``has_tma_loads``),
whose PTX has none. The report gives the wgmma
instruction shapes (``m64n128k16``...: the tile one warpgroup multiplies per instruction)
and ``+TMA`` where the PTX loads through tensor descriptors,
and the exit status is 1 if any configuration fails.

Compiles are CPU-bound, so they run in a pool of ``--jobs`` processes started with the *spawn*
method. ``TRITON_INTERPRET`` is removed from the environment while the pool runs: under the
interpreter ``@triton.jit`` returns interpreter objects instead of compilable kernels, and since
Triton reads the variable when a kernel module is imported, the workers must never see it (a
parent running under the interpreter keeps its own, already imported, kernels). Kernels reach
the workers by module and name, so they must be module-level ``@triton.jit`` functions. A worker
that dies (e.g. a segfault in the compiler) breaks the pool; the jobs caught in it are rerun one
process each, so only the culprit is reported as failed.

A spec whose ``arch_family`` is set is launched by the dispatcher on that architecture family
only (the large-M GEMM tiles have one table for sm_8x and one for sm_90), so it is compiled
for the requested targets of that family only, and a run for sm_80 and sm_90 has fewer
compiles than twice the specs. The header on stderr says which specs those are; the count of
finished compiles follows on stderr (in place on a terminal, about ten lines in a log).

``--cuda`` adds the CUDA C++ kernels of ``csrc/`` (``fastpeft.check_cuda``: ``nvcc -Xptxas -v``
per source and architecture, failing on register spills, GPU-scope fences and global atomics) as a second table and a ``"cuda"``
section of the JSON report; skipped, with the reason, when nvcc is absent.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TextIO

from fastpeft.kernel_report import (
    ARCHS,
    DEFAULT_ARCHS,
    Arch,
    Result,
    atomics_problem,
    forbidden_sync,
    global_atomics,
)
from fastpeft.kernels.aot_spec import unspecialized_args

if TYPE_CHECKING:
    from fastpeft.check_cuda import CudaReport
    from fastpeft.kernels.aot_spec import KernelSpec



# Threads per warp on every NVIDIA GPU; GPUTarget's third field (warp_size) in Triton 3.x.
_WARP_SIZE = 32
# Removed from the workers' environment: under it, @triton.jit makes interpreter objects.
_INTERPRET_VAR = "TRITON_INTERPRET"
# Triton 3.9 warns about its FP-fusion default on every compile, once per worker process; it says
# nothing about the kernel being checked and would bury the table.
_FP_FUSION_WARNING = "TRITON_DEFAULT_FP_FUSION"
# Why a job whose worker died alone failed; the worker's own stderr says more.
_DIED = "worker process died (compiler crash, out of memory, or it could not start: see stderr)"
# Parameter attribute that tells Triton a pointer/integer is a multiple of 16, as its launcher does.
_DIVISIBILITY_ATTR = [["tt.divisibility", 16]]
# Progress lines when stderr is not a terminal (a log): one per tenth of the compiles, so a
# full run (~270 compiles, ~90 s on two cores) logs ~10 lines instead of one per compile.
_PROGRESS_LINES = 10


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs to compile one spec for one arch (picklable: no function)."""

    spec_name: str
    fn_module: str
    fn_qualname: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    aligned_params: tuple[str, ...]
    expects_wgmma: bool
    expects_tma: bool
    arch: str
    enable_fp_fusion: bool = True


@dataclass(frozen=True)
class PtxasStats:
    """What ``ptxas -v`` reports for a PTX module (spills summed over its functions)."""

    registers: int
    spill_stores: int
    spill_loads: int


# ---------------------------------------------------------------------------------------------
# Parent side: validate specs, run the pool, report.
# ---------------------------------------------------------------------------------------------


def _fn_reference(fn: object) -> tuple[str, str]:
    """Module and qualified name under which a worker process can import ``fn``.

    Works for JIT and interpreter objects alike (both keep the Python function in ``.fn``).
    Raises ValueError when ``fn`` is not reachable that way (a nested or renamed function).
    """
    py_fn = getattr(fn, "fn", fn)
    module, qualname = getattr(py_fn, "__module__", None), getattr(py_fn, "__qualname__", "")
    if module is None or "<locals>" in qualname or _resolve(module, qualname) is not fn:
        raise ValueError(
            f"kernel {qualname or fn!r} must be a module-level @triton.jit function "
            "(workers import it by module and name)"
        )
    return module, qualname


def _resolve(module: str, qualname: str) -> object:
    """Import ``module`` and return the object at ``qualname`` in it (None if missing)."""
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _spec_problem(spec: KernelSpec) -> str | None:
    """Why ``spec`` cannot be compiled as written, or None if it is consistent."""
    arg_names = list(getattr(spec.fn, "arg_names", None) or [])
    if not arg_names:
        return f"fn is not a @triton.jit function: {spec.fn!r}"
    if list(spec.signature) != arg_names:
        return f"signature must list every parameter in order {arg_names}, got {list(spec.signature)}"
    constexpr_names = {name for name, ty in spec.signature.items() if ty == "constexpr"}
    if set(spec.constexprs) != constexpr_names:
        return (
            f"constexprs must give exactly the constexpr parameters {sorted(constexpr_names)}, "
            f"got {sorted(spec.constexprs)}"
        )
    bad_hints = [n for n in spec.aligned_params() if spec.signature.get(n, "constexpr") == "constexpr"]
    if bad_hints:
        return f"divisible_by_16 names non-runtime parameters {bad_hints}"
    exempt = [n for n in spec.aligned_params() if n in unspecialized_args(spec.fn)]
    if exempt:
        return f"divisible_by_16 names parameters the kernel never specializes (do_not_specialize) {exempt}"
    if spec.num_warps < 1 or spec.num_warps & (spec.num_warps - 1):
        return f"num_warps must be a power of two, got {spec.num_warps}"
    return None


def _make_jobs(spec: KernelSpec, archs: Sequence[str]) -> list[_Job] | str:
    """One job per arch for ``spec``, or the reason the spec is invalid."""
    problem = _spec_problem(spec)
    if problem is not None:
        return problem
    try:
        module, qualname = _fn_reference(spec.fn)
    except ValueError as exc:
        return str(exc)
    return [
        _Job(
            spec_name=spec.name,
            fn_module=module,
            fn_qualname=qualname,
            signature=dict(spec.signature),
            constexprs=dict(spec.constexprs),
            num_warps=spec.num_warps,
            num_stages=spec.num_stages,
            aligned_params=spec.aligned_params(),
            expects_wgmma=spec.expects_wgmma_on_sm90,
            expects_tma=spec.expects_tma_on_sm90,
            arch=arch,
            enable_fp_fusion=spec.enable_fp_fusion,
        )
        for arch in archs
        if spec.runs_on(ARCHS[arch].capability)
    ]


@contextmanager
def _without_env(var: str) -> Iterator[None]:
    """Remove ``var`` from the environment (inherited by spawned processes) for the block."""
    saved = os.environ.pop(var, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[var] = saved


def _no_progress(result: Result) -> None:
    """The default ``on_done`` callback: report nothing."""


def _run_pool(
    jobs: Sequence[_Job], processes: int, on_done: Callable[[Result], None]
) -> tuple[dict[int, Result], list[int]]:
    """Compile ``jobs`` in a spawn pool; return results by index and the indices lost to a crash.

    ``on_done`` is called with each result as it arrives (not for the jobs lost to a crash)."""
    results: dict[int, Result] = {}
    crashed: list[int] = []
    with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_compile_job, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except BrokenProcessPool:
                crashed.append(i)
            except Exception as exc:  # e.g. a constexpr value that cannot be pickled
                results[i] = _failure(jobs[i], f"could not run in a worker: {exc!r}")
            if i in results:
                on_done(results[i])
    return results, crashed


def _run_alone(job: _Job) -> Result:
    """Compile one job in its own process, so that a crash is attributed to it."""
    results, crashed = _run_pool([job], 1, _no_progress)
    if crashed:
        return _failure(job, _DIED)
    return results[0]


def _compile_all(jobs: Sequence[_Job], processes: int, on_done: Callable[[Result], None]) -> list[Result]:
    """Compile every job with up to ``processes`` workers, in the order given; ``on_done`` is
    called with each result as it arrives."""
    if not jobs:
        return []
    with _without_env(_INTERPRET_VAR):
        results, crashed = _run_pool(jobs, min(processes, len(jobs)), on_done)
        # A dead worker breaks the whole pool and every job still in it; rerun those one by one.
        with ThreadPoolExecutor(max_workers=processes) as threads:
            for i, result in zip(crashed, threads.map(lambda i: _run_alone(jobs[i]), crashed)):
                results[i] = result
                on_done(result)
    return [results[i] for i in range(len(jobs))]


def _plan(specs: Sequence[KernelSpec], archs: Sequence[str]) -> list[_Job | Result]:
    """One job per (spec, arch it runs on), by spec, then by arch; an invalid spec gets a
    failed row for every arch instead."""
    planned: list[_Job | Result] = []
    for spec in specs:
        made = _make_jobs(spec, archs)
        if isinstance(made, str):
            planned.extend(Result(spec.name, arch, reason=f"invalid spec: {made}") for arch in archs)
        else:
            planned.extend(made)
    return planned


def _compile_plan(
    planned: Sequence[_Job | Result], jobs: int, on_done: Callable[[Result], None] = _no_progress
) -> list[Result]:
    """Compile the planned jobs with ``jobs`` processes; one Result per planned row, in order."""
    compiled = iter(_compile_all([p for p in planned if isinstance(p, _Job)], jobs, on_done))
    return [next(compiled) if isinstance(p, _Job) else p for p in planned]


def _run(specs: Sequence[KernelSpec], archs: Sequence[str], jobs: int) -> list[Result]:
    """Compile every spec for every arch it runs on; one Result per (spec, arch), by spec, then by arch."""
    return _compile_plan(_plan(specs, archs), jobs)


def _kernel_names(specs: Sequence[KernelSpec]) -> str:
    """The distinct kernels of ``specs``: their names without the bracketed configuration."""
    return ", ".join(dict.fromkeys(spec.name.split("[", 1)[0] for spec in specs))


def _coverage_lines(specs: Sequence[KernelSpec], archs: Sequence[str]) -> list[str]:
    """Which specs compile for only some of ``archs``, and why (empty when all run on every one).

    A spec with ``arch_family`` set is launched by the dispatcher on that architecture family
    only (e.g. the large-M GEMM tiles, which have one table for sm_8x and one for sm_90), so it
    is compiled for the requested targets of that family and no other.
    """
    groups: dict[tuple[str, ...], list[KernelSpec]] = {}
    for spec in specs:
        targets = tuple(a for a in archs if spec.runs_on(ARCHS[a].capability))
        groups.setdefault(targets, []).append(spec)
    partial = {targets: group for targets, group in groups.items() if targets != tuple(archs)}
    if not partial:
        return []
    lines = [
        f"  {len(groups.get(tuple(archs), []))} spec(s) compile for {'each of ' if len(archs) > 1 else ''}"
        f"{', '.join(archs)}; "
        f"{sum(map(len, partial.values()))} are launched on one architecture family only "
        "(KernelSpec.arch_family: per-architecture tile tables, e.g. the large-M GEMM tiles) "
        "and compile only for the requested targets of that family:"
    ]
    for targets, group in partial.items():
        where = f"{' and '.join(targets)} only" if targets else "no requested target (skipped)"
        lines.append(f"    {where}: {len(group)} spec(s) of {_kernel_names(group)}")
    return lines


class _Progress:
    """Counts finished compiles on ``stream``: a counter rewritten in place (``\\r``) on a
    terminal, otherwise a line at every ``1 / _PROGRESS_LINES`` of the total."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.done = self.failed = 0
        self.start = time.monotonic()
        self.in_place = stream.isatty()
        self.every = max(1, math.ceil(total / _PROGRESS_LINES))

    def __call__(self, result: Result) -> None:
        """Count ``result`` and show the progress if it is time to."""
        self.done += 1
        self.failed += result.status != "ok"
        text = (f"fastpeft check: {self.done}/{self.total} compiled ({100 * self.done // self.total}%), "
                f"{self.failed} failed, {time.monotonic() - self.start:.0f} s")
        if self.in_place:
            self.stream.write("\r" + text + ("\n" if self.done == self.total else ""))
            self.stream.flush()
        elif self.done % self.every == 0 or self.done == self.total:
            print(text, file=self.stream, flush=True)


def _format_table(results: Sequence[Result]) -> str:
    """The report as an aligned text table, one line per (spec, arch)."""
    header = ("kernel", "arch", "regs", "spill B", "shared B", "mma", "status")
    lines = [header]
    for r in results:
        wgmma = "-" if r.wgmma is None else ((r.wgmma_shapes or "yes") if r.wgmma else "no")
        if r.hmma is not None:  # a CUDA C++ row: its SASS's tensor-core instruction count
            wgmma = f"HMMA x{r.hmma}"
        if r.tma:
            wgmma += " +TMA"
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        cells = (r.kernel, r.arch, r.registers, r.spill_bytes, r.shared_bytes, wgmma, status)
        lines.append(tuple("-" if c is None else str(c) for c in cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines
    )


def _write_json(path: str, results: Sequence[Result], cuda: CudaReport | None = None) -> None:
    """Write the report (same rows as the table, plus full failure details) as JSON; with
    ``cuda``, the CUDA C++ section under ``"cuda"`` (its nvcc, rows, or why it was skipped)."""
    import triton

    def rows(results: Sequence[Result]) -> list[dict]:
        return [{**asdict(r), "spill_bytes": r.spill_bytes} for r in results]

    payload: dict[str, object] = {"triton_version": triton.__version__, "results": rows(results)}
    if cuda is not None:
        payload["cuda"] = {"nvcc": cuda.nvcc, "skipped": cuda.skipped, "results": rows(cuda.results)}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _load_specs() -> list[KernelSpec]:
    """Every kernel configuration the package's dispatcher can choose."""
    from fastpeft.kernels import all_kernel_specs

    return list(all_kernel_specs())


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``fastpeft check`` options."""
    parser = argparse.ArgumentParser(
        prog="fastpeft check",
        description="Compile every Triton kernel configuration for real GPU targets without a GPU; "
        "fail on compile errors, register spills, shared memory over the limit, GPU-scope fences or "
        "ordered atomics, global atomics (relaxed included), or missing wgmma or TMA loads.",
    )
    parser.add_argument(
        "--arch",
        default=",".join(DEFAULT_ARCHS),
        help=f"comma-separated targets among {', '.join(ARCHS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel compile processes (default: all CPUs)",
    )
    parser.add_argument("--filter", default="", help="only specs whose name contains this substring")
    parser.add_argument("--list", action="store_true", help="list the matching specs and exit")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="also compile the CUDA C++ kernels (csrc/*.cu) with nvcc -Xptxas -v and fail on register "
        "spills, GPU-scope fences and global atomics (skipped, with the reason, when nvcc is absent)",
    )
    args = parser.parse_args(list(argv))
    args.arch = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in args.arch if a not in ARCHS]
    if unknown or not args.arch:
        parser.error(f"--arch: unknown target(s) {unknown}; choose among {', '.join(ARCHS)}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def main(argv: list[str]) -> int:
    """Run ``fastpeft check``: exit status 0 if every configuration passes, 1 if not, 2 on misuse."""
    try:
        args = _parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors
        return int(exc.code or 0)
    try:
        specs = [s for s in _load_specs() if args.filter in s.name]
    except Exception as exc:
        print(f"fastpeft check: cannot load the kernel specs: {exc!r}", file=sys.stderr)
        return 2
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        print(f"fastpeft check: duplicate spec names {duplicates}", file=sys.stderr)
        return 2
    if not specs:
        print(f"fastpeft check: no kernel spec matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(names))
        return 0
    planned = _plan(specs, args.arch)
    header = [
        f"fastpeft check: {len(specs)} spec(s) for {', '.join(args.arch)}: {len(planned)} compile(s) "
        f"with {args.jobs} process(es)",
        *_coverage_lines(specs, args.arch),
    ]
    print("\n".join(header), file=sys.stderr, flush=True)
    progress = _Progress(sum(isinstance(p, _Job) for p in planned), sys.stderr)
    results = _compile_plan(planned, args.jobs, progress)
    print(_format_table(results))
    cuda = _check_cuda(args) if args.cuda else None
    failed = [r for r in results + (cuda.results if cuda else []) if r.status != "ok"]
    for r in failed:
        if r.detail:
            print(f"\n--- {r.kernel} [{r.arch}]: {r.reason}\n{r.detail.rstrip()}")
    if args.json:
        _write_json(args.json, results, cuda)
    print("\n" + _summary(results))
    total = len(results) + (len(cuda.results) if cuda else 0)
    print(f"{total - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _check_cuda(args: argparse.Namespace) -> CudaReport:
    """Run and print the CUDA C++ section (``fastpeft.check_cuda``)."""
    from fastpeft import check_cuda

    print("fastpeft check: CUDA C++ kernels (csrc/*.cu, nvcc -Xptxas -v) ...", file=sys.stderr, flush=True)
    report = check_cuda.run(args.arch, args.jobs)
    if report.skipped:
        print(f"\nCUDA C++ kernels: skipped: {report.skipped}")
    else:
        print(f"\nCUDA C++ kernels ({report.nvcc}):\n" + _format_table(report.results))
    return report


def _summary(results: Sequence[Result]) -> str:
    """Totals of the report: spill bytes, configurations with forbidden synchronization or
    global atomics, and the wgmma shapes per kernel (how many configurations use each)."""
    spills = sum(r.spill_bytes or 0 for r in results)
    synced = [r for r in results if r.sync]
    atomic = [r for r in results if r.atomics]
    shapes: dict[str, dict[str, int]] = {}
    for r in results:
        counts = shapes.setdefault(r.kernel.split("[", 1)[0], {})
        for shape in filter(None, r.wgmma_shapes.split("+")):
            counts[shape] = counts.get(shape, 0) + 1
    lines = [
        f"register spills: {spills} bytes in all",
        f"GPU-scope fences / ordered atomics: {len(synced)} configuration(s)"
        + (f" ({', '.join(sorted({r.sync for r in synced}))})" if synced else ""),
        f"global atomics: {len(atomic)} configuration(s)"
        + (f" ({', '.join(dict.fromkeys(r.kernel.split('[', 1)[0] for r in atomic))})" if atomic else ""),
    ]
    lines += [
        f"wgmma shapes of {kernel}: " + ", ".join(f"{shape} x{count}" for shape, count in sorted(counts.items()))
        for kernel, counts in shapes.items()
        if counts
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Worker side: compile one job and judge it. Runs in spawned processes.
# ---------------------------------------------------------------------------------------------


def _failure(job: _Job, reason: str, detail: str = "") -> Result:
    """A failed row for ``job``."""
    return Result(job.spec_name, job.arch, reason=reason, detail=detail)


def _compile_job(job: _Job) -> Result:
    """Compile ``job``, run ptxas and judge the result; never raises."""
    try:
        ptx, shared = _compile_to_ptx(job)
        stats = run_ptxas(ptx, ARCHS[job.arch])
    except Exception as exc:
        summary = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        reason = f"compile error: {type(exc).__name__}: {summary}"[:200]
        return _failure(job, reason, "".join(traceback.format_exception_only(type(exc), exc)))
    result = Result(
        job.spec_name,
        job.arch,
        registers=stats.registers,
        spill_stores=stats.spill_stores,
        spill_loads=stats.spill_loads,
        shared_bytes=shared,
        wgmma=has_wgmma(ptx),
        wgmma_shapes="+".join(wgmma_shapes(ptx)),
        tma=has_tma_loads(ptx),
        sync=", ".join(forbidden_sync(ptx)),
        atomics=", ".join(global_atomics(ptx)),
    )
    problems = judge(result, ARCHS[job.arch], job.expects_wgmma, job.expects_tma)
    result.status, result.reason = ("FAIL", "; ".join(problems)) if problems else ("ok", "")
    return result


def _compile_to_ptx(job: _Job) -> tuple[str, int]:
    """Compile ``job`` with Triton for its arch; return the PTX and the shared memory in bytes."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _resolve(job.fn_module, job.fn_qualname)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{job.fn_module}.{job.fn_qualname} is {type(fn).__name__}, not a JITFunction")
    source = _ast_source(fn, job)
    target = GPUTarget("cuda", ARCHS[job.arch].capability, _WARP_SIZE)
    options = {"num_warps": job.num_warps, "num_stages": job.num_stages, "enable_fp_fusion": job.enable_fp_fusion}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{_FP_FUSION_WARNING}")
        kernel = triton.compile(source, target=target, options=options)
    return kernel.asm["ptx"], int(kernel.metadata.shared)


def _ast_source(fn: object, job: _Job) -> object:
    """Build Triton's ASTSource for ``job``.

    Triton >= 3.3 takes ``constexprs`` keyed by parameter name and a signature that lists every
    parameter ("constexpr" for constexpr ones); ``attrs`` maps ``(index,)`` to attribute lists.
    Triton <= 3.2 took ``constants`` and an ``AttrsDescriptor`` instead, which this does not support.
    """
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        import triton

        raise RuntimeError(
            f"fastpeft check needs Triton >= 3.3 (ASTSource(constexprs=...)), found {triton.__version__}"
        )
    attrs = {(fn.arg_names.index(name),): _DIVISIBILITY_ATTR for name in job.aligned_params}
    return ASTSource(fn=fn, signature=dict(job.signature), constexprs=dict(job.constexprs), attrs=attrs)


def _ptxas_candidates(capability: int) -> list[str]:
    """ptxas binaries to try, Triton's own choice for this arch first.

    Triton writes PTX for the ISA version of the ptxas it will use, and its wheel may ship
    several (``ptxas`` and ``ptxas-blackwell``, the latter used for sm_90 since Triton 3.9), so
    the one that accepts the PTX is the one to ask.
    """
    import triton

    candidates = []
    try:  # Triton >= 3.9 picks per arch
        from triton.backends.nvidia.compiler import get_ptxas

        candidates.append(get_ptxas(capability).path)
    except Exception:  # absent or failing in this Triton version: fall back to the others
        pass
    try:  # Triton 3.4-3.8: one ptxas, overridable with TRITON_PTXAS_PATH
        candidates.append(triton.knobs.nvidia.ptxas.path)
    except Exception:  # absent or failing in this Triton version: fall back to the wheel's
        pass
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    candidates += [str(p) for p in sorted(bin_dir.glob("ptxas*"))]
    return list(dict.fromkeys(c for c in candidates if c and os.path.isfile(c)))


def run_ptxas(ptx: str, arch: Arch) -> PtxasStats:
    """Assemble ``ptx`` for ``arch`` with ``ptxas -v`` and return its statistics."""
    candidates = _ptxas_candidates(arch.capability)
    if not candidates:
        raise RuntimeError("no ptxas found in Triton's wheel (triton/backends/nvidia/bin)")
    outputs = []
    with tempfile.TemporaryDirectory(prefix="fastpeft-check-") as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        for ptxas in candidates:
            cubin_path = Path(tmp) / "kernel.cubin"
            cmd = [ptxas, "-v", f"--gpu-name={arch.ptxas_name}", str(ptx_path), "-o", str(cubin_path)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            output = proc.stdout + proc.stderr
            if proc.returncode == 0:
                return parse_ptxas_output(output)
            outputs.append(f"$ {' '.join(cmd)}\n{output}")
            if "Unsupported .version" not in output:  # a real error, not a too-old ptxas
                break
    raise RuntimeError("ptxas failed:\n" + "\n".join(outputs))


_REGISTERS_RE = re.compile(r"Used (\d+) registers")
_SPILLS_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_output(output: str) -> PtxasStats:
    """Parse ``ptxas -v`` output: the most registers of any function, and total spill bytes."""
    registers = [int(n) for n in _REGISTERS_RE.findall(output)]
    spills = [(int(s), int(l)) for s, l in _SPILLS_RE.findall(output)]
    if not registers or not spills:
        raise RuntimeError(f"unexpected ptxas -v output:\n{output}")
    return PtxasStats(
        registers=max(registers),
        spill_stores=sum(s for s, _ in spills),
        spill_loads=sum(l for _, l in spills),
    )


_WGMMA_RE = re.compile(r"\bwgmma\.")


def has_wgmma(ptx: str) -> bool:
    """Whether the PTX uses Hopper's warpgroup matrix instructions (``wgmma.*``)."""
    return _WGMMA_RE.search(ptx) is not None


_WGMMA_SHAPE_RE = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.(m\d+n\d+k\d+)\b")


def wgmma_shapes(ptx: str) -> list[str]:
    """The distinct shapes of the PTX's ``wgmma.mma_async`` instructions (``m64n128k16``...),
    widest N first: a 64-row tile on one warpgroup gives m64nBLOCK_N, on two warpgroups
    m64n(BLOCK_N/2)."""
    found = set(_WGMMA_SHAPE_RE.findall(ptx))
    return sorted(found, key=lambda shape: (-int(re.search(r"n(\d+)", shape).group(1)), shape))


_TMA_LOAD_RE = re.compile(r"\bcp\.async\.bulk\.tensor\.\d+d\.shared::\w+\.global\b")


def has_tma_loads(ptx: str) -> bool:
    """Whether the PTX loads through a TMA tensor descriptor: ``cp.async.bulk.tensor.Nd`` from
    global into shared memory (what a ``TensorDescriptor.load`` becomes on sm_90; the shared
    state space is ``::cluster`` or ``::cta`` by PTX version)."""
    return _TMA_LOAD_RE.search(ptx) is not None


def judge(result: Result, arch: Arch, expects_wgmma: bool, expects_tma: bool = False) -> list[str]:
    """Reasons a compiled configuration fails (empty if it passes)."""
    problems = []
    if result.spill_bytes:
        problems.append(
            f"register spills ({result.spill_stores} B stores, {result.spill_loads} B loads "
            f"at {result.registers} registers)"
        )
    if result.shared_bytes is not None and result.shared_bytes > arch.max_shared_bytes:
        problems.append(f"shared memory {result.shared_bytes} B > {arch.max_shared_bytes} B limit")
    if result.sync:
        problems.append(f"GPU-scope fence or ordered atomic ({result.sync})")
    if result.atomics:
        problems.append(atomics_problem(result))
    if arch.has_wgmma and expects_wgmma and not result.wgmma:
        problems.append("expected wgmma, but the PTX has no wgmma instruction")
    if arch.has_wgmma and expects_tma and not result.tma:
        problems.append("expected TMA loads, but the PTX has no cp.async.bulk.tensor load")
    return problems
