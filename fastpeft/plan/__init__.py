"""``fastpeft plan``: a performance plan anyone can check without a GPU (issue 19).

For each op family at the key shapes (``fastpeft.plan.problems``) and each implementation the
dispatch can run (``fastpeft.plan.paths``), the real launchers and torch paths run on meta
tensors with every kernel launch and aten op recorded instead of run
(``fastpeft.plan.recording``), so the grids, tiles and splits are the launch code's own. Each
launch's DRAM traffic by its tiling and its FLOPs (``fastpeft.plan.traffic``,
``fastpeft.plan.kernel_costs``) give an estimated time; each row sets them beside the
problem's minimum bytes, FLOPs and roofline (``fastpeft.plan.model``); ``fastpeft.plan.report``
prints the table, writes the JSON and puts the focused benchmark's measured times beside the
estimates. ``python -m fastpeft.plan.cli`` or ``fastpeft plan`` runs it.

Importing this package imports the Triton launchers (Triton must be installed).
"""

from __future__ import annotations

from fastpeft.plan.gpus import GPUS, GpuSpec
from fastpeft.plan.model import PlanRow, build_plan
from fastpeft.plan.report import compare_lines, plan_json, table

__all__ = ["GPUS", "GpuSpec", "PlanRow", "build_plan", "compare_lines", "plan_json", "table"]
