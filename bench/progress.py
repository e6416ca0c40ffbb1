"""A one-line progress bar for the training benchmark (no dependency; stderr, terminals only).

On a terminal it redraws one line with the overall fraction done, the run in progress and an
estimate of the time left (from the average time per step so far). Elsewhere (a log file, CI) it
prints nothing, and the harness's one line per finished run is the progress report.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24


class Progress:
    """Progress over ``runs`` runs of ``steps`` steps each.

    Call :meth:`start_run` before a run, :meth:`step` after each of its steps (it fits
    ``train_one``'s ``progress`` callback), :meth:`clear` before printing anything else.
    """

    def __init__(
        self, runs: int, steps: int, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(1, runs * steps)
        self.steps = steps
        self.done_runs = 0
        self.label = ""
        self._started = time.perf_counter()
        self._drawn = False

    def start_run(self, label: str) -> None:
        self.label = label

    def step(self, step: int) -> None:
        """Record that step ``step`` (1-based) of the current run finished, and redraw."""
        if not self.enabled:
            return
        done = self.done_runs * self.steps + step
        fraction = done / self.total
        elapsed = time.perf_counter() - self._started
        left = elapsed / done * (self.total - done) if done else float("nan")
        filled = round(BAR_WIDTH * fraction)
        line = (
            f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * fraction:3.0f}%  {self.label} "
            f"step {step}/{self.steps}  ~{_minutes(left)} left"
        )
        self.stream.write(line.ljust(100))
        self.stream.flush()
        self._drawn = True
        if step == self.steps:
            self.done_runs += 1

    def end_run(self, steps_run: int) -> None:
        """A run stopped early (diverged): count it as finished."""
        if steps_run < self.steps:
            self.done_runs += 1

    def clear(self) -> None:
        """Erase the bar so that a normal line can be printed."""
        if self._drawn:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self._drawn = False


def _minutes(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing measured yet
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
