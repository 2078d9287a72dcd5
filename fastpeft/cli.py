"""Command line: ``fastpeft bench`` (the benchmark harness), ``fastpeft check``
(ahead-of-time compile of every Triton kernel configuration for real GPU targets),
``fastpeft plan`` (the performance plan of the key shapes, without a GPU) and ``fastpeft
tune`` (validate and time the kernels on this machine's GPU; the table ``auto`` follows)."""

from __future__ import annotations

import argparse
import sys

import fastpeft

# One line per command for ``fastpeft --help``; each command's own ``--help`` says the rest.
COMMANDS: dict[str, str] = {
    "bench": "benchmark the LoRA linear layer (base F.linear, naive PyTorch, HF PEFT, torch.compile, "
    "fastpeft) on Llama-3-8B shapes, the bottleneck adapter (against AdapterHub's module structure) "
    "and multi-adapter LoRA (against PEFT's mixed batch, a loop and padded ranks; --ops selects), "
    "plus end-to-end LoRA / prompt / prefix training steps against PEFT; prints tables with the "
    "spread of every timing and writes JSON / markdown / a plot with --out DIR",
    "check": "compile every Triton kernel configuration ahead of time for sm_80 / sm_90 (no GPU "
    "needed) and fail on compile errors, register spills, shared memory over the limit or a "
    "large-M GEMM without wgmma on sm_90; --cuda also compiles csrc/ with nvcc -Xptxas -v",
    "tune": "validate the LoRA kernels on this machine's GPU against float64, time the ones that passed beside "
    "the torch path, and write the per-device table FASTPEFT_BACKEND=auto then follows (--rehearse: on the CPU)",
    "plan": "the performance plan of each op family at the key shapes without a GPU: the path and kernel "
    "configuration the dispatch chooses, its grid and waves, its memory traffic by tiling against the "
    "problem's minimum, the roofline and an estimated time (--json, --gpu, --compare a focused benchmark JSON)",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--help``, ``--version`` and the choice of command."""
    parser = argparse.ArgumentParser(
        prog="fastpeft",
        description="Fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning: benchmark, compile check "
        "and performance plan.",
        epilog="Run 'fastpeft COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {fastpeft.__version__}")
    # Not required=True: then "fastpeft --foo" would say COMMAND is missing, not that --foo is
    # unknown; main reports a missing command itself.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        # add_help=False: "fastpeft bench --help" belongs to the command's own parser.
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fastpeft COMMAND [options]``; the command's exit status (2 on a usage error).

    The top-level options (``--help``, ``--version``) are flags that exit, so the command is
    always the first argument and everything after it goes to the command's own parser.
    Raises SystemExit for ``--help``, ``--version`` and usage errors, as argparse does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = parser.parse_args(argv[:1]).command
    if command is None:
        parser.error("the following arguments are required: COMMAND")
    if command == "bench":
        from fastpeft.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    if command == "plan":
        from fastpeft.plan.cli import main as plan_main

        return plan_main(argv[1:])
    if command == "tune":
        from fastpeft.tune.cli import main as tune_main

        return tune_main(argv[1:])
    from fastpeft.check import main as check_main

    return check_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
