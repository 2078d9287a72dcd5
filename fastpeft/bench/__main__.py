"""``fastpeft bench`` / ``python -m fastpeft.bench``: LoRA linear benchmark on this machine.

GPU default: Llama-3-8B shapes x M in {1, 16, 512, 4096, 8192} x r in {8, 16, 64}, bf16.
CPU default: two shapes, M in {1, 16, 128}, r = 16, fp32 (under two minutes on two cores).
After the LoRA grid come the other ops (--ops): the bottleneck adapter (fused Triton / CUDA C++ /
torch path against AdapterHub's module and its torch.compile, with the memory roofline on a
GPU) and the multi-LoRA mixed batch (against HF PEFT's adapter_names batch, a per-adapter loop
and vLLM-style padded ranks, over the base linear). The full default run also has the
end-to-end case (run first): one LoRA training step of a Llama model, fastpeft vs PEFT (~1.1B
parameters in bf16 on a GPU, a small fp32 one on CPU); --e2e runs only that case. --focused
runs the focused kernel benchmark instead (``fastpeft.bench.focused``: fused / hybrid / torch
path against F.linear, PEFT and torch.compile, and the other ops' key shapes, CUDA-graph timed,
within a time budget; its options: --focused --help).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fastpeft.bench import op_runs
from fastpeft.bench.analysis import analyze
from fastpeft.bench.cases import CPU_GRID, GPU_GRID, QUICK_GRID, SHAPES_BY_NAME, CaseGrid, LayerShape
from fastpeft.bench.e2e import (
    E2EConfig, default_e2e_config, e2e_markdown, missing_packages, print_e2e_report, run_e2e,
)
from fastpeft.bench.export import write_json
from fastpeft.bench.op_bench import op_report_markdown, op_report_text
from fastpeft.bench.implementations import COMPILE, IMPLEMENTATION_NAMES, PEFT, default_implementations
from fastpeft.bench.report import markdown_report, print_report
from fastpeft.bench.runner import DEFAULT_DROPOUT, BenchConfig, run_benchmark
from fastpeft.bench.timing import CPU_BUDGET, GPU_BUDGET, QUICK_BUDGET

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUT_FILES = {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"}
# Options that select part of the layer grid: a run with any of them is not the full default
# run, so it leaves the end-to-end case out; with --e2e (no layer grid) they are errors.
GRID_OPTIONS = ("quick", "shapes", "m", "r", "impls", "ops")
# The options that select part of the LoRA grid: given without --ops, only the LoRA op runs.
LORA_GRID_OPTIONS = ("shapes", "m", "r", "impls")


def _comma_list(parse_item: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        return [parse_item(item) for item in items]

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _shape(text: str) -> LayerShape:
    if text not in SHAPES_BY_NAME:
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}; choose from {', '.join(SHAPES_BY_NAME)}")
    return SHAPES_BY_NAME[text]


def _implementation(text: str) -> str:
    if text not in IMPLEMENTATION_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown implementation {text!r}; choose from {', '.join(IMPLEMENTATION_NAMES)}"
        )
    return text


def _op(text: str) -> str:
    if text not in op_runs.OPS:
        raise argparse.ArgumentTypeError(f"unknown op {text!r}; choose from {', '.join(op_runs.OPS)}")
    return text


def selected_ops(args: argparse.Namespace) -> tuple[str, ...]:
    """``--ops``, else every op, or only LoRA when an option selects part of its grid."""
    if args.ops:
        return tuple(dict.fromkeys(args.ops))
    if any(getattr(args, name) for name in LORA_GRID_OPTIONS):
        return (op_runs.LORA,)
    return op_runs.OPS


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"dropout {value} is not in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpeft bench",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one case (k/v, M=16, r=8), 3 timed calls, "
                        "no torch.compile unless --impls names it")
    parser.add_argument("--shapes", type=_comma_list(_shape), help=f"comma list of {', '.join(SHAPES_BY_NAME)}")
    parser.add_argument("--m", type=_comma_list(_positive_int), help="comma list of token counts M")
    parser.add_argument("--r", type=_comma_list(_positive_int), help="comma list of LoRA ranks")
    parser.add_argument("--impls", type=_comma_list(_implementation),
                        help=f"comma list of {', '.join(IMPLEMENTATION_NAMES)} (default: all installed)")
    parser.add_argument("--ops", type=_comma_list(_op),
                        help=f"comma list of {', '.join(op_runs.OPS)} (default: all; only {op_runs.LORA} when "
                        "--shapes, --m, --r or --impls is given)")
    parser.add_argument("--dropout", type=_dropout, default=DEFAULT_DROPOUT,
                        help=f"LoRA dropout in fwd+bwd timings (default {DEFAULT_DROPOUT}); "
                        "saved activations are always measured at 0.1")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the report as markdown here")
    parser.add_argument("--plot", type=Path, help="write a ratio-vs-M plot here (needs matplotlib)")
    parser.add_argument("--out", type=Path,
                        help=f"directory for {', '.join(OUT_FILES.values())} (the plot when matplotlib is installed)")
    e2e = parser.add_mutually_exclusive_group()
    e2e.add_argument("--e2e", action="store_true",
                     help="only the end-to-end case: one LoRA training step (all linear layers, r 16) of a Llama "
                     "model, fastpeft vs PEFT: tokens/s and memory (the full default run has it too)")
    e2e.add_argument("--skip-e2e", action="store_true",
                     help="leave the end-to-end case out of the full default run (runs that select part of "
                     "the layer grid, --quick included, always leave it out)")
    parser.add_argument("--e2e-checkpointing", action="store_true",
                        help="gradient checkpointing (non-reentrant) in the end-to-end case (default off)")
    parser.add_argument("--focused", action="store_true",
                        help="run the focused kernel benchmark instead, with its own options "
                        "(fastpeft bench --focused --help)")
    return parser


def _device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device:
    """``--device``, else cuda when available; ``parser.error`` when cuda is asked for but absent."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    """The run configuration; ``parser.error`` (exit 2) on arguments this machine cannot honour."""
    device = _device(args, parser)
    on_gpu = device.type == "cuda"
    grid = QUICK_GRID if args.quick else GPU_GRID if on_gpu else CPU_GRID
    grid = CaseGrid(tuple(args.shapes or grid.shapes), tuple(args.m or grid.ms), tuple(args.r or grid.ranks))
    impls = args.impls or [i for i in default_implementations() if not (args.quick and i == COMPILE)]
    if PEFT in impls and importlib.util.find_spec("peft") is None:
        parser.error("--impls peft: PEFT is not installed (pip install peft)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot: matplotlib is not installed (pip install matplotlib)")
    return BenchConfig(
        grid=grid,
        implementations=tuple(dict.fromkeys(impls)),
        device=device,
        dtype=DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")],
        dropout=args.dropout,
        budget=QUICK_BUDGET if args.quick else GPU_BUDGET if on_gpu else CPU_BUDGET,
        seed=args.seed,
    )


def e2e_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> E2EConfig | None:
    """The end-to-end case's configuration, or None when this run leaves it out; ``parser.error``
    on options that contradict it. The full default run leaves it out, with a note, when
    transformers or peft is missing."""
    grid_options = [f"--{name}" for name in GRID_OPTIONS if getattr(args, name)]
    if args.e2e and (grid_options or args.plot):
        parser.error(f"--e2e runs no layer grid: {', '.join(grid_options or ['--plot'])} cannot go with it")
    wanted = args.e2e or not (args.skip_e2e or grid_options)
    if args.e2e_checkpointing and not wanted:
        parser.error("--e2e-checkpointing: this run leaves the end-to-end case out")
    missing = missing_packages() if wanted else []
    if missing and args.e2e:
        parser.error(f"--e2e: {' and '.join(missing)} not installed (pip install {' '.join(missing)})")
    if missing:
        print(f"fastpeft bench: end-to-end case left out: {' and '.join(missing)} not installed", file=sys.stderr)
    if not wanted or missing:
        return None
    return default_e2e_config(
        _device(args, parser), DTYPES[args.dtype] if args.dtype else None,
        dropout=args.dropout, gradient_checkpointing=args.e2e_checkpointing, seed=args.seed,
    )


def _directory_problem(directory: Path) -> str | None:
    """Why no file can be written in ``directory``, or None. A file is created and removed to
    find out: permission bits say nothing for root, read-only mounts or ACLs."""
    if not directory.exists():
        return f"directory {directory} does not exist"
    if not directory.is_dir():
        return f"{directory} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fastpeft-bench-"):
            return None
    except OSError as exc:
        return f"cannot write in {directory} ({exc.strerror or exc})"


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file, or None (an existing file is opened for appending,
    which leaves it as it is)."""
    if path.is_dir():
        return "is a directory"
    if not path.exists():
        return _directory_problem(path.parent)
    try:
        with path.open("a"):
            return None
    except OSError as exc:
        return f"cannot write it ({exc.strerror or exc})"


def _make_out_dir(out: Path) -> str | None:
    """Create ``out`` (and its parents) unless it exists; why it cannot hold the results, or None."""
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, or not writable
        return f"cannot create the directory ({exc.strerror or exc})"
    return _directory_problem(out)


def output_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Path | None]:
    """Where to write json / markdown / plot: explicit paths first, then ``--out DIR`` (created).
    ``parser.error`` (exit 2) when a path cannot be written, before anything is measured."""
    paths = {kind: getattr(args, kind) for kind in OUT_FILES}
    for kind, path in paths.items():
        problem = None if path is None else _file_problem(path)
        if problem is not None:
            parser.error(f"--{kind} {path}: {problem}")
    if args.out is not None:
        problem = _make_out_dir(args.out)
        if problem is not None:
            parser.error(f"--out {args.out}: {problem}")
        plot = not args.e2e and importlib.util.find_spec("matplotlib") is not None  # --e2e: no layer grid to plot
        for kind, name in OUT_FILES.items():
            if paths[kind] is None and (kind != "plot" or plot):
                paths[kind] = args.out / name
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every measurement worked and fastpeft passed the saved-activation
    criterion, 1 otherwise, 2 on bad arguments.

    The end-to-end case runs before the layer grid: its time is bounded, while the grid may be
    stopped by a time limit (scripts/gpu_run.sh) and still reports what it measured."""
    # scripts/gpu_run.sh stops an overlong run with SIGINT (timeout -s INT) and the runner then
    # reports what it measured; a shell without job control may start us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--focused" in argv:
        from fastpeft.bench.focused import main as focused_main

        return focused_main([arg for arg in argv if arg != "--focused"])
    parser = build_parser()
    args = parser.parse_args(argv)
    e2e_config = e2e_config_from_args(args, parser)
    config = None if args.e2e else config_from_args(args, parser)
    ops = () if args.e2e else selected_ops(args)
    paths = output_paths(args, parser)
    e2e = run_e2e(e2e_config) if e2e_config is not None else None
    interrupted = e2e is not None and e2e.interrupted
    analysis = None
    if config is not None and op_runs.LORA in ops and not interrupted:
        analysis = analyze(run_benchmark(config))
        interrupted = analysis.run.interrupted
    op_analyses = {} if config is None or interrupted else op_runs.run_ops(ops, config, quick=args.quick)
    if analysis is None:
        paths["plot"] = None  # the plot shows the layer grid only
    else:
        print_report(analysis)
    for op_analysis in op_analyses.values():
        print()
        print(op_report_text(op_analysis))
    if e2e is not None:
        if analysis is not None or op_analyses:
            print()  # a blank line between the reports
        print_e2e_report(e2e)
    if paths["json"]:
        write_json(analysis, paths["json"], e2e, op_analyses)
    if paths["markdown"]:
        sections = [op_report_markdown(a) for a in op_analyses.values()]
        sections += [e2e_markdown(e2e)] if e2e is not None else []
        paths["markdown"].write_text(markdown_report(analysis, sections))
    plot_failed = False
    if paths["plot"]:
        from fastpeft.bench.plot import write_plot

        try:
            write_plot(analysis, paths["plot"])
        except ValueError as exc:
            print(f"fastpeft bench: no plot written: {exc}", file=sys.stderr)
            paths["plot"], plot_failed = None, True
    written = [str(p) for p in paths.values() if p]
    if written:
        print("wrote " + ", ".join(written))
    failed = ((analysis is not None and analysis.failed) or (e2e is not None and e2e.failed)
              or any(a.failed for a in op_analyses.values()))
    return 1 if failed or plot_failed else 0


if __name__ == "__main__":
    sys.exit(main())
