"""Command line: ``fastpeft bench`` (the benchmark harness) and ``fastpeft check``
(ahead-of-time compile of every Triton kernel configuration for real GPU targets)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: fastpeft {bench,check} [options]  (fastpeft <command> --help for more)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from fastpeft.bench.__main__ import main as bench_main

        return bench_main(rest)
    if command == "check":
        from fastpeft.check import main as check_main

        return check_main(rest)
    print(f"fastpeft: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
