"""The plan's rows: each problem's implementations, their recorded launches, traffic and times.

Per launch (``LaunchPlan``): its grid (CTAs, waves = CTAs / the GPU's SMs), its traffic
(``fastpeft.plan.traffic``) and an estimated time::

    est_us = LAUNCH_US + max(l2_bytes / (BW * BW_FRACTION * fill), flops / (PEAK * FLOPS_FRACTION * fill))

with ``fill = waves / ceil(waves)`` the share of SMs busy over the launch (a grid of half a
wave leaves half the GPU idle; 1.5 waves run as 2), and 1 for torch ops (cuBLAS and aten
size their own grids). It is an estimate, meant to be checked against measured times
(``fastpeft plan --compare``), not a measurement: it assumes the launches run one after
another, each at the achievable fraction of the datasheet peaks, and it is pessimistic for a
bandwidth-bound grid of a few CTAs (a lone SM can draw more than its 1/SMs share of the
bandwidth).

Per row (``PlanRow``, one problem on one implementation): the sums over its launches, the
problem's ``min_bytes`` and ``flops`` (``fastpeft.plan.problems``), its roofline time
``max(min_bytes / BW, flops / PEAK)`` at the datasheet peaks, and the target of issue 19:
``bytes`` (no L2 reuse) within ``BYTES_TARGET`` x ``min_bytes``, and the row's main Triton
launch at least ``WAVES_TARGET`` waves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fastpeft.bench.forced import forced_backend
from fastpeft.plan import kernel_costs
from fastpeft.plan.gpus import GpuSpec
from fastpeft.plan.paths import PathRun, paths
from fastpeft.plan.problems import MODES, OPS, Problem, problems
from fastpeft.plan.recording import Launch, recording
from fastpeft.plan.traffic import Cost, Hardware, torch_op_cost

# Time a launch costs beyond its work: eager PyTorch takes ~4-5 us of host time per op
# (dispatch and cudaLaunchKernel) on a recent CPU, so a chain of launches shorter than that
# is host-bound when run eagerly. Inside a CUDA graph (the focused benchmark's timing) the gap
# between dependent kernels is ~1-2 us: ``--launch-us`` sets another value.
LAUNCH_US = 4.0
# Achievable fractions of the datasheet peaks, as the project's H200 measured them
# (KERNEL_NOTES.md): a device copy ~4.3 of 4.8 TB/s, a bf16 8192^3 cuBLAS matmul ~790 of 989
# TFLOP/s.
BW_FRACTION = 0.9
FLOPS_FRACTION = 0.8
# An operand counts as L2-resident (read from DRAM once) when it fits in this share of the
# L2: the rest of the cache holds the streams passing through it (the other operand's tiles,
# the output).
L2_SHARE = 0.5
# Issue 19's target: at most this many times the problem's minimum bytes, at least one wave.
BYTES_TARGET = 1.5
WAVES_TARGET = 1.0
# Constexprs that say nothing about the tile (numerics and argument flags) and stay out of
# the printed configuration.
_NOT_CONFIG = frozenset({"UPCAST", "PRECISION", "HAS_BIAS", "GROUP_M"})


def _fill(waves: float) -> float:
    return waves / math.ceil(waves) if waves > 0 else 1.0


def config_text(launch: Launch) -> str:
    """A Triton launch's tile: ``BLOCK_M=64`` as ``M64``, true flags by name, warps, stages."""
    if not launch.is_triton:
        return ""
    parts = []
    for name, value in launch.params.items():
        if name in _NOT_CONFIG or name in ("num_warps", "num_stages"):
            continue
        if name.startswith("BLOCK_") and isinstance(value, int):
            parts.append(f"{name[6:]}{value}")
        elif value is True:
            parts.append(name.lower())
    parts.append(f"w{launch.params.get('num_warps')}s{launch.params.get('num_stages')}")
    return " ".join(parts)


@dataclass(frozen=True)
class LaunchPlan:
    """One launch of a row: what ran, from where, its grid, traffic, FLOPs and time."""

    kernel: str
    source: str
    grid: tuple[int, ...] | None
    ctas: int | None
    waves: float | None
    config: str
    bytes: int
    l2_bytes: int
    flops: int
    mem_us: float
    flops_us: float
    est_us: float
    est_no_l2_us: float


def plan_launch(launch: Launch, gpu: GpuSpec, launch_us: float) -> LaunchPlan:
    """The traffic and estimated time of one recorded launch on ``gpu``."""
    hw = Hardware(gpu.sms, int(gpu.l2_bytes * L2_SHARE))
    cost: Cost = kernel_costs.triton_cost(launch, hw) if launch.is_triton else torch_op_cost(launch)
    ctas = launch.ctas
    waves = ctas / gpu.sms if ctas is not None else None
    fill = _fill(waves) if waves is not None else 1.0
    bandwidth = gpu.hbm_gb_s * 1e3 * BW_FRACTION * fill  # bytes per us
    compute = gpu.bf16_tflops * 1e6 * FLOPS_FRACTION * fill  # FLOPs per us
    mem_us, flops_us = cost.l2_bytes / bandwidth, cost.flops / compute
    return LaunchPlan(launch.name, launch.source, launch.grid, ctas, waves, config_text(launch), cost.bytes,
                      cost.l2_bytes, cost.flops, mem_us, flops_us, launch_us + max(mem_us, flops_us),
                      launch_us + max(cost.bytes / bandwidth, flops_us))


@dataclass(frozen=True)
class PlanRow:
    """``problem`` on one implementation (``fastpeft.plan.paths``); ``kernel``, ``config``,
    ``source``, ``ctas`` and ``waves`` describe its main launch: the Triton launch with the
    longest estimate, or for the torch path its longest op."""

    problem: Problem
    path: str
    choice: str
    kernel: str
    config: str
    source: str
    ctas: int | None
    waves: float | None
    launches: int
    bytes: int
    l2_bytes: int
    min_bytes: int
    flops: int
    roofline_us: float
    est_us: float
    est_no_l2_us: float
    bound: str
    target: str
    kernels: tuple[LaunchPlan, ...]

    @property
    def bytes_ratio(self) -> float:
        return self.bytes / self.min_bytes

    @property
    def meets_target(self) -> bool:
        return self.target == "ok"

    def as_json(self) -> dict[str, Any]:
        """The row as plain data: the issue's fields (``op, M, K, N, r, dtype, path, kernel,
        ctas, waves, bytes, min_bytes, flops, roofline_us, est_us``, ``source``) and the rest,
        with every launch under ``"kernels"``."""
        p = self.problem
        out = {"op": p.op, "mode": p.mode, "M": p.m, "K": p.k, "N": p.n, "r": p.r, "adapters": p.adapters,
               "dtype": dtype_name(p.dtype), "adapter_dtype": dtype_name(p.adapter_dtype)}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("problem", "kernels")})
        out["kernels"] = [asdict(k) for k in self.kernels]
        return out


def dtype_name(dtype: Any) -> str:
    """torch's name of ``dtype`` without the prefix: ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def _target(bytes_: int, l2_bytes: int, min_bytes: int, main: LaunchPlan, compute_us: float, gpu: GpuSpec) -> str:
    """``"ok"``, or what misses issue 19's target (bytes over BYTES_TARGET x the minimum,
    fewer than WAVES_TARGET waves). A bytes miss also gives the ratio with L2 reuse, and is
    marked ``under compute`` when that traffic moves in less time than the FLOPs take (at the
    datasheet peaks): the extra bytes then cost no time in the estimate."""
    misses = []
    if bytes_ > BYTES_TARGET * min_bytes:
        hidden = l2_bytes / (gpu.hbm_gb_s * 1e3) <= compute_us
        misses.append(f"bytes {bytes_ / min_bytes:.1f}x (L2 {l2_bytes / min_bytes:.1f}x"
                      + (", under compute)" if hidden else ")"))
    if main.waves is not None and main.waves < WAVES_TARGET:
        misses.append(f"{main.waves:.2f} waves")
    return "; ".join(misses) or "ok"


def _bound(launches: list[LaunchPlan], launch_us: float) -> str:
    """What most of the estimate is: ``launch`` overhead, ``memory`` or ``compute`` time."""
    totals = {"launch": launch_us * len(launches), "memory": 0.0, "compute": 0.0}
    for lp in launches:
        totals["memory" if lp.mem_us >= lp.flops_us else "compute"] += max(lp.mem_us, lp.flops_us)
    return max(totals, key=totals.get)


def plan_row(problem: Problem, run: PathRun, launches: list[Launch], gpu: GpuSpec, launch_us: float) -> PlanRow:
    """The row of ``problem`` on ``run``'s implementation from its recorded ``launches``."""
    planned = [plan_launch(launch, gpu, launch_us) for launch in launches]
    triton = [lp for lp in planned if lp.grid is not None]
    main = max(triton or planned, key=lambda lp: lp.est_us)
    bytes_, l2_bytes = sum(lp.bytes for lp in planned), sum(lp.l2_bytes for lp in planned)
    min_bytes, flops = problem.min_bytes(), problem.flops()
    roofline = max(min_bytes / (gpu.hbm_gb_s * 1e3), flops / (gpu.bf16_tflops * 1e6))
    compute_us = sum(lp.flops for lp in planned) / (gpu.bf16_tflops * 1e6)
    return PlanRow(
        problem, run.path, ",".join(run.choice),
        main.kernel, main.config, main.source, main.ctas, main.waves, len(planned), bytes_, l2_bytes, min_bytes,
        flops, roofline, sum(lp.est_us for lp in planned), sum(lp.est_no_l2_us for lp in planned),
        _bound(planned, launch_us), _target(bytes_, l2_bytes, min_bytes, main, compute_us, gpu), tuple(planned),
    )


def build_plan(
    gpu: GpuSpec, ops: tuple[str, ...] = OPS, modes: tuple[str, ...] = MODES, path_names: tuple[str, ...] | None = None,
    launch_us: float = LAUNCH_US,
) -> list[PlanRow]:
    """The plan of every key shape of ``ops`` in ``modes`` on ``gpu``: one row per problem and
    implementation (only ``path_names``, if given)."""
    rows = []
    for problem in problems(ops, modes):
        for run in paths(problem, gpu):
            if path_names is not None and run.path not in path_names:
                continue
            with forced_backend(run.backend), recording(gpu) as launches:
                run.run()
            rows.append(plan_row(problem, run, launches, gpu, launch_us))
    return rows
