"""``run_cli``: the ``fastpeft`` command line run in-process, as the CLI tests need it."""

from __future__ import annotations

import pytest

from fastpeft import cli


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``fastpeft ARGS``: exit status (argparse's SystemExit included), stdout, stderr."""
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
