"""``fastpeft plan``: the performance plan of the key shapes, without a GPU.

    fastpeft plan [--gpu h100] [--json plan.json] [--ops lora,qlora,bottleneck,multi-lora]
                  [--modes fwd,fwd+bwd] [--paths torch,fused,...] [--misses] [--launch-us 4]
                  [--compare focused.json]

Prints the table (``fastpeft.plan.report.table``) and a summary line to stdout; ``--json``
writes every row with its launches; ``--compare`` also prints each time the focused
benchmark measured beside the plan's estimate (its GPU, when ``--gpu`` is not given, from the
benchmark's ``settings.device_name``). Exit status 0, 2 on a usage error or an unreadable
file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fastpeft.plan.gpus import GPUS, GpuSpec, gpu_for_device_name
from fastpeft.plan.model import LAUNCH_US, build_plan
from fastpeft.plan.paths import PATH_NAMES
from fastpeft.plan.problems import MODES, OPS
from fastpeft.plan.report import compare_lines, legend, plan_json, summary, table

DEFAULT_GPU = "h100"


def _choices(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {', '.join(allowed)}; "
                                         f"got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpeft plan",
        description="For each op family at the key shapes: the path and kernel configuration the dispatch "
        "chooses, its grid, its memory traffic by tiling, the problem's minimum bytes and FLOPs, the roofline "
        "and an estimated time. Runs the real launchers on meta tensors; no GPU needed.",
    )
    parser.add_argument("--gpu", choices=sorted(GPUS), help=f"the GPU to plan for (default: {DEFAULT_GPU}, or "
                        "the GPU of the --compare JSON)")
    parser.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    parser.add_argument("--ops", type=lambda t: _choices(t, OPS, "--ops"), default=OPS,
                        help=f"op families (default: {','.join(OPS)})")
    parser.add_argument("--modes", type=lambda t: _choices(t, MODES, "--modes"), default=MODES,
                        help=f"modes (default: {','.join(MODES)})")
    parser.add_argument("--paths", type=lambda t: _choices(t, PATH_NAMES, "--paths"), default=None,
                        help=f"only these paths ({','.join(PATH_NAMES)}; default: all)")
    parser.add_argument("--misses", action="store_true", help="print only the rows that miss the target")
    parser.add_argument("--launch-us", type=float, default=LAUNCH_US, metavar="US",
                        help=f"estimated cost of one launch (default: {LAUNCH_US:g} us, eager PyTorch)")
    parser.add_argument("--compare", metavar="FOCUSED_JSON",
                        help="fastpeft bench --focused's JSON: print its measured times beside the estimates")
    return parser


def _gpu(args: argparse.Namespace, focused: dict | None) -> GpuSpec:
    if args.gpu:
        return GPUS[args.gpu]
    name = (focused or {}).get("settings", {}).get("device_name")
    found = gpu_for_device_name(name) if isinstance(name, str) else None
    return found or GPUS[DEFAULT_GPU]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fastpeft plan``; 0, or 2 on a usage error or a file that cannot be read or written."""
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.launch_us < 0:
        parser.print_usage(sys.stderr)
        print("fastpeft plan: error: --launch-us must be >= 0", file=sys.stderr)
        return 2
    focused = None
    if args.compare:
        try:
            with open(args.compare) as f:
                focused = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"fastpeft plan: cannot read --compare {args.compare}: {exc}", file=sys.stderr)
            return 2
    gpu = _gpu(args, focused)
    rows = build_plan(gpu, args.ops, args.modes, args.paths, args.launch_us)
    shown = [r for r in rows if not r.meets_target] if args.misses else rows
    print("\n".join([*legend(gpu, args.launch_us), "", table(shown), "", summary(rows)]))
    if focused is not None:
        print("\nmeasured (fastpeft bench --focused) vs estimated:")
        print("\n".join(compare_lines(focused, rows)) or "(no measured time matches a plan row)")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(plan_json(rows, gpu, args.launch_us), f, indent=1)
                f.write("\n")
        except OSError as exc:
            print(f"fastpeft plan: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
