"""What ``fastpeft tune`` shows while it runs: on a terminal, a progress bar on the last line
(cases done of those planned, time spent, time left by the cases' pace or the time budget,
whichever ends first) with each finished case's line printed above it; elsewhere (a log file,
CI) one plain line per case, ``[done/planned] ...``."""

from __future__ import annotations

import time
from typing import TextIO

# Characters of the bar itself (a line of ~80 columns with the counts and times beside it).
BAR_WIDTH = 30


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Reports a run of ``planned`` cases within ``budget_s`` seconds on ``stream``, as a bar
    when ``stream`` is a terminal (module docstring)."""

    def __init__(self, stream: TextIO, budget_s: float, prefix: str = "[tune] ") -> None:
        self.stream = stream
        self.budget_s = budget_s
        self.prefix = prefix
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        # The run's clock (the budget counts the validation before the cases) and the cases'.
        self.start = self.cases_start = time.monotonic()
        self.planned = 0
        self.done = 0
        self._bar_shown = False

    def begin(self, planned: int) -> None:
        """The cases are about to run (their pace is measured from now)."""
        self.planned, self.done, self.cases_start = planned, 0, time.monotonic()
        self._draw()

    def message(self, text: str) -> None:
        """A line of the log (above the bar on a terminal)."""
        self._clear()
        print(f"{self.prefix}{text}", file=self.stream, flush=True)
        self._draw()

    def case(self, text: str) -> None:
        """One more case done, ``text`` saying what it found."""
        self.done += 1
        self.message(text if self.tty else f"[{self.done}/{self.planned}] {text}")

    def close(self) -> None:
        """The run is over: the bar is removed."""
        self._clear()
        self.planned = 0

    def bar(self) -> str:
        """The bar's text: ``[#####-----] 12/74 cases, 1:05 spent, 3:55 left`` (spent since the
        run began; left: the cases' pace or the budget, whichever ends first)."""
        now = time.monotonic()
        spent = now - self.start
        filled = BAR_WIDTH * self.done // max(1, self.planned)
        left = self.budget_s - spent
        if self.done:
            left = min(left, (now - self.cases_start) / self.done * (self.planned - self.done))
        return (f"{self.prefix}[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {self.done}/{self.planned} cases, "
                f"{_clock(spent)} spent, {_clock(left)} left")

    def _draw(self) -> None:
        if self.tty and self.planned:
            self.stream.write("\r" + self.bar())
            self.stream.flush()
            self._bar_shown = True

    def _clear(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[2K")
            self._bar_shown = False
