"""Domain exceptions. Library code raises these with a message that says what to do;
`cli.main` turns them into one line on stderr and a non-zero exit code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class WandacliError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""

    exit_code = 2


class ModelError(WandacliError):
    """The model cannot be found, loaded, or does not match what was expected."""


class DataError(WandacliError):
    """A calibration or evaluation data set cannot be found or used."""


class StoreError(WandacliError):
    """A store, score set or mask is missing, damaged, foreign or locked."""


class ChecksumError(StoreError):
    """A stored array failed its fletcher32 checksum."""


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""


class ConfigError(WandacliError):
    """A config file or a combination of options is invalid."""


class ResumeMismatchError(StoreError):
    """Unfinished work in the store was made with different settings."""


class NonFiniteScoresError(StoreError):
    """Scores contain NaN or Inf values."""


class InterruptedRun(WandacliError):
    """The run was stopped by a signal; finished work was kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """Raised from the SIGTERM handler. A BaseException, like KeyboardInterrupt, so that
    `except Exception` blocks in library code do not swallow it."""


@contextmanager
def interruptible(what_is_kept: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C (exit 130) and SIGTERM (exit 143) inside the block become one InterruptedRun
    whose line says what was kept and how to go on: `what_is_kept()`."""
    try:
        yield
    except KeyboardInterrupt:
        raise InterruptedRun(f"interrupted: {what_is_kept()}", 130) from None
    except Terminated:
        raise InterruptedRun(f"terminated: {what_is_kept()}", 143) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
