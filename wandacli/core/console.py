"""The terminal: one Rich console on stderr for progress and logs, one on stdout for results.

Results (tables, --json) go to stdout so they can be piped; everything else goes to stderr.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# stderr: progress bars, warnings, log lines.
console = Console(stderr=True, highlight=False)
# stdout: tables and machine-readable output. Redirected to a file (the pipeline's
# results.txt), Rich would lay tables out for 80 columns and truncate their cells; a file has no
# width, so tables get room for every column (COLUMNS still wins).
FILE_WIDTH = 160
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal and "COLUMNS" not in os.environ:
    out.width = FILE_WIDTH


def warn(message: str) -> None:
    """A warning line on stderr."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, soft_wrap=True)


def info(message: str) -> None:
    """A log line on stderr (silenced by WANDACLI_QUIET=1)."""
    if os.environ.get("WANDACLI_QUIET") != "1":
        console.print(message, markup=False, soft_wrap=True)


class Reporter(Protocol):
    """What long-running library code needs from a progress display."""

    def start(self, description: str, total: int, completed: int = 0) -> None: ...

    def advance(self, steps: int = 1) -> None: ...

    def finish(self) -> None: ...


class NullReporter:
    """Reports nothing (library use, tests)."""

    def start(self, description: str, total: int, completed: int = 0) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


class RichReporter:
    """A Rich progress bar on stderr; one task at a time."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start(self, description: str, total: int, completed: int = 0) -> None:
        self.finish()
        self._task = self._progress.add_task(description, total=total, completed=completed)

    def advance(self, steps: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, steps)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
            self._task = None


# Seconds between two progress lines in a log (stderr not a terminal): often enough to see a
# run is alive under nohup, tmux logging, Slurm or CI, rarely enough to keep the log readable.
LOG_INTERVAL_SECONDS = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LogReporter:
    """Plain progress lines on stderr, for a log rather than a terminal: one when a step
    starts, one every `interval` seconds with done/total, the rate and the time left, and one
    when it ends."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._description: str | None = None
        self._total = self._done = self._first = 0
        self._started = self._last = 0.0

    def _line(self, message: str) -> None:
        console.print(message, markup=False, soft_wrap=True)

    def start(self, description: str, total: int, completed: int = 0) -> None:
        self.finish()
        self._description, self._total = description, total
        self._done = self._first = completed
        self._started = self._last = self._clock()
        resumed = f", {completed} already done" if completed else ""
        self._line(f"{description}: started, {total} steps{resumed}")

    def advance(self, steps: int = 1) -> None:
        if self._description is None:
            return
        self._done += steps
        now = self._clock()
        if now - self._last >= self.interval and self._done < self._total:
            self._last = now
            self._line(self._status(now))

    def _status(self, now: float) -> str:
        elapsed = now - self._started
        new = self._done - self._first
        rate = new / elapsed if elapsed > 0 else 0.0
        share = f" ({self._done / self._total:.0%})" if self._total else ""
        text = f"{self._description}: {self._done}/{self._total}{share}"
        if rate > 0:
            per = f"{rate:.2f}/s" if rate >= 1 else f"{1 / rate:.0f} s each"
            left = _duration((self._total - self._done) / rate)
            text += f", {per}, about {left} left"
        return text

    def finish(self) -> None:
        if self._description is None:
            return
        elapsed = self._clock() - self._started
        self._line(f"{self._description}: done, {self._done}/{self._total} in {_duration(elapsed)}")
        self._description = None


@contextmanager
def progress_reporter(enabled: bool = True) -> Iterator[Reporter]:
    """A Reporter while the block runs: a Rich progress bar on a terminal, plain lines every
    LOG_INTERVAL_SECONDS (WANDACLI_PROGRESS_SECONDS) where stderr goes to a log; nothing
    with `enabled` False (--no-progress; warnings and errors still print)."""
    if not enabled:
        yield NullReporter()
        return
    if not console.is_terminal:
        interval = float(os.environ.get("WANDACLI_PROGRESS_SECONDS", LOG_INTERVAL_SECONDS))
        reporter = LogReporter(interval)
        try:
            yield reporter
        finally:
            reporter.finish()
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield RichReporter(progress)


@contextmanager
def download_progress(description: str, total_bytes: int | None) -> Iterator[Callable[[int], None]]:
    """A byte-counting progress bar on stderr; yields a function that adds received bytes."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total_bytes)
        yield lambda received: progress.advance(task, received)


@contextmanager
def quiet_hub_clients() -> Iterator[None]:
    """The hub clients log a warning per failed or retried request (`HEAD https://...`) before
    raising; our one-line error replaces them, so their loggers and warnings are silenced while
    they run."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "fsspec")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
