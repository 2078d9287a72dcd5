"""``fastpeft tune``: validate and time the kernels of the LoRA op, the bottleneck adapter and
multi-LoRA on this machine's GPU and write the table ``FASTPEFT_BACKEND=auto`` follows there
(``fastpeft.tune.run``, ``fastpeft.kernels.tuned_table``).

``--rehearse`` runs the whole pipeline on the CPU (the kernels in Triton's interpreter, tiny
shapes, a made-up device) and writes its table under ``--out``: CI keeps the command working
without a GPU; ``auto`` never reads such a table (its device is no GPU's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastpeft.backend import interpreting, triton_available

if TYPE_CHECKING:
    from fastpeft.tune.run import TuneConfig

# The ops the command tunes (fastpeft.tune.ops), all by default.
ALL_OPS = ("lora", "bottleneck", "multi_lora")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_DTYPES = {"fp32": torch.float32, "same": None}
# A few minutes: on Llama-3-8B's shapes the LoRA op's 40 cases (4 layers x 2 ranks x 5), the
# bottleneck adapter's 10 and multi-LoRA's 24 at about 3 s each (checks and timing) on an
# H100, est.
DEFAULT_BUDGET_S = 300.0
# The rehearsal's device: no GPU's name, so no machine's auto ever reads its table.
REHEARSAL_GPU = "rehearsal (CPU, Triton interpreter)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpeft tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a transformers config.json, a directory holding one, or a model name: the "
                                   "layer shapes to tune (default: Llama-3-8B's)")
    p.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated ops (default: all of {', '.join(ALL_OPS)})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--adapter-dtype", choices=sorted(ADAPTER_DTYPES), default="fp32",
                   help="LoRA weights' dtype: fp32 (PEFT's default on a 16-bit model) or the activations'")
    p.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"stop starting new cases after this long (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--out", type=Path, help="directory of the table (default: the one auto reads, "
                                            "$FASTPEFT_TUNE_DIR or the user cache; required with --rehearse)")
    p.add_argument("--json", type=Path, help="also write the run's report (table, failures) as JSON here")
    p.add_argument("--rehearse", action="store_true", help="the whole pipeline on the CPU, in Triton's interpreter")
    return p


def _usage(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"fastpeft tune: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """Run ``fastpeft tune``: 0 when it wrote a table, 1 when nothing could be timed, 2 on misuse."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown or not ops:
        return _usage(parser, f"--ops: unknown op(s) {unknown}; choose from {', '.join(ALL_OPS)}")
    if not args.time_budget > 0:
        return _usage(parser, "--time-budget must be a positive number of seconds")
    if args.rehearse:
        if args.out is None:
            return _usage(parser, "--rehearse needs --out (its table is for no GPU: keep it out of the cache)")
        if "triton" in sys.modules and not interpreting():
            return _usage(parser, "--rehearse needs Triton's interpreter: set TRITON_INTERPRET=1 before Triton loads")
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        return _usage(parser, "no CUDA device: fastpeft tune times the kernels on a GPU (--rehearse runs on the CPU)")
    if not triton_available():
        return _usage(parser, "the triton package is not installed: there are no kernels to tune")
    try:
        config = _config(args, tuple(dict.fromkeys(ops)))
    except (OSError, ValueError) as exc:
        return _usage(parser, str(exc))
    from fastpeft.tune.progress import Progress
    from fastpeft.tune.run import tune
    from fastpeft.tune.table_file import write_table

    result = tune(config, Progress(sys.stderr, config.time_budget_s))
    for failure in result.failures:
        print(f"[tune] FAILED {failure}", file=sys.stderr)
    if args.json is not None:
        report = {"table": result.table, "failures": result.failures, "peft": result.peft, "done": result.done,
                  "planned": result.planned, "interrupted": result.interrupted}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if not result.table["entries"]:
        print("[tune] nothing was timed: no table written", file=sys.stderr)
        return 1
    path = write_table(result.table, args.out if args.out is not None else _default_dir())
    print(f"wrote {path}: {len(result.table['entries'])} entries, {result.done} of {result.planned} cases"
          f"{' (time budget reached)' if result.interrupted else ''}, {len(result.failures)} validation failure(s)")
    return 0


def _default_dir() -> Path:
    from fastpeft.kernels.tuned_table import tune_dir

    return tune_dir()


def _config(args: argparse.Namespace, ops: tuple[str, ...]) -> TuneConfig:
    """The run's ``TuneConfig`` from the options (the rehearsal's, or this GPU's)."""
    from fastpeft.bench.cases import LayerShape
    from fastpeft.bench.runner import DEFAULT_DROPOUT
    from fastpeft.bench.timing import GPU_BUDGET, QUICK_BUDGET
    from fastpeft.kernels.bottleneck.configs import MAX_RANK as BOTTLENECK_MAX_RANK
    from fastpeft.kernels.tuned_table import device_fingerprint, fingerprint
    from fastpeft.tune import shapes
    from fastpeft.tune.run import TuneConfig

    dtype = DTYPES[args.dtype]
    adapter_dtype = ADAPTER_DTYPES[args.adapter_dtype] or dtype
    if args.rehearse:
        device = torch.device("cpu")
        device_fp = device_fingerprint(REHEARSAL_GPU, 0, "none")
        # Tiny shapes (the interpreter runs a kernel program at a time): one layer, one decode
        # and one batch row count, rank 8 (and a bottleneck of 8 at D = 64).
        grid = shapes.Grid(layers=(LayerShape("tiny", 64, 80),), hidden=64, decode_ms=(1,), train_ms=(33,),
                           ranks=(8,), bottleneck_ranks=(8,), dtype=dtype, adapter_dtype=adapter_dtype,
                           dropout_p=DEFAULT_DROPOUT, tiny=True)
        timing = QUICK_BUDGET
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        device_fp = fingerprint(device.index)
        layers = shapes.model_shapes(args.model)
        hidden = layers[0].in_features  # the q/o projection's input: the model's hidden size
        grid = shapes.Grid(layers=layers, hidden=hidden, decode_ms=shapes.DECODE_MS, train_ms=shapes.TRAIN_MS,
                           ranks=shapes.RANKS, bottleneck_ranks=shapes.bottleneck_ranks(hidden, BOTTLENECK_MAX_RANK),
                           dtype=dtype, adapter_dtype=adapter_dtype, dropout_p=DEFAULT_DROPOUT)
        timing = GPU_BUDGET
    return TuneConfig(device=device, fingerprint=device_fp, ops=ops, grid=grid, timing=timing,
                      time_budget_s=args.time_budget, time_peft=importlib.util.find_spec("peft") is not None)
