"""The ``fastpeft`` command line (fastpeft/cli.py): help, version, usage errors, dispatch."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import fastpeft
from fastpeft import check, cli
from fastpeft.bench import __main__ as bench_main
from tests.helpers.cli_runner import run_cli


def test_help_says_what_each_command_does(capsys):
    code, out, err = run_cli(["--help"], capsys)
    assert code == 0 and err == ""
    flat = " ".join(out.split())  # argparse wraps the lines
    for name, summary in cli.COMMANDS.items():
        assert name in out and summary in flat
    assert "--version" in out


def test_version_is_the_package_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"fastpeft {fastpeft.__version__}"
    assert fastpeft.__version__ == importlib.metadata.version("fastpeft")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["benchmark"], "invalid choice: 'benchmark'"),
        (["--verbose", "bench"], "unrecognized arguments: --verbose"),
    ],
)
def test_usage_errors_go_to_stderr_with_status_2(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: fastpeft") and message in err


@pytest.mark.parametrize(("command", "module"), [("bench", bench_main), ("check", check)])
def test_the_rest_of_the_arguments_go_to_the_command(monkeypatch, command, module):
    received = []
    monkeypatch.setattr(module, "main", lambda argv: received.append(argv) or 7)
    assert cli.main([command, "--help", "--version", "x"]) == 7
    assert received == [["--help", "--version", "x"]]


def test_plan_gets_the_rest_of_the_arguments(monkeypatch):
    plan_cli = pytest.importorskip("fastpeft.plan.cli")  # the plan imports the Triton launchers
    received = []
    monkeypatch.setattr(plan_cli, "main", lambda argv: received.append(argv) or 7)
    assert cli.main(["plan", "--help", "--gpu", "h200"]) == 7
    assert received == [["--help", "--gpu", "h200"]]


def test_command_help_is_the_commands_own(capsys):
    code, out, _ = run_cli(["bench", "--help"], capsys)
    assert code == 0 and out.startswith("usage: fastpeft bench") and "--out" in out


def test_console_entry_point_without_arguments_exits_2():
    proc = subprocess.run([sys.executable, "-m", "fastpeft.cli"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "usage: fastpeft" in proc.stderr
