"""``fastpeft tune``'s progress report: a bar on a terminal (redrawn below each case's line,
removed at the end, time left by the pace or the budget), plain numbered lines elsewhere."""

from __future__ import annotations

import io

from fastpeft.tune import progress as progress_module
from fastpeft.tune.progress import BAR_WIDTH, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal():
    out = io.StringIO()
    p = Progress(out, budget_s=60)
    p.message("validating")
    p.begin(2)
    p.case("first")
    p.case("second")
    p.close()
    assert out.getvalue() == "[tune] validating\n[tune] [1/2] first\n[tune] [2/2] second\n"


def test_a_bar_on_a_terminal(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    out = Terminal()
    p = Progress(out, budget_s=620)
    now[0] += 20  # the validation before the cases counts against the budget
    p.begin(4)
    assert p.bar() == f"[tune] [{'-' * BAR_WIDTH}] 0/4 cases, 0:20 spent, 10:00 left"
    now[0] += 30
    p.case("first")
    # one case in 30 s: three more take 90 s, before the budget's 570 s
    quarter = BAR_WIDTH // 4
    assert p.bar() == f"[tune] [{'#' * quarter}{'-' * (BAR_WIDTH - quarter)}] 1/4 cases, 0:50 spent, 1:30 left"
    now[0] += 560
    p.case("second")
    # the pace says 4:55 more; the budget has 0:10 left
    assert p.bar().endswith("2/4 cases, 10:10 spent, 0:10 left")
    p.close()
    text = out.getvalue()
    # each line is printed on a cleared line, the bar redrawn after it, and cleared at the end
    assert "\r\033[2K[tune] first\n\r[tune] [" in text and text.endswith("\r\033[2K")
    assert text.count("\n") == 2
