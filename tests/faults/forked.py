"""`wandacli` processes forked from a server that has already imported torch, transformers and
wandacli, for the fault-injection tests that start dozens of them.

Each is a real process with its own pid, memory and file descriptors, killed by real signals,
and its exit status read as subprocess reports it (-9 for SIGKILL). What it skips is the ~5 s
interpreter start and import of a fresh `python -m wandacli`, which the tests do not exercise
(`tests/test_fresh_machine.py` runs the installed script from scratch). Tests whose subject is
read at import or library start (HDF5's file-locking variable) keep using fresh processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Imported once in the fork server, inherited by every child.
PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "h5py",
    "wandacli.cli",
    "wandacli.scoring.run",
    "wandacli.removal.prune",
    "tests.faults.run_cli",
]

_context: Any = None


def _server() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(args: list[str], env: dict[str, str], out: str, err: str, fault: str | None) -> None:
    """In the forked process: the environment, stdout/stderr to files, default signal
    behaviour (Ctrl-C raises KeyboardInterrupt, SIGTERM kills unless wandacli handles it), an
    injected fault if any, then the CLI as `python -m wandacli` would run it."""
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    if fault is not None:
        from tests.faults.run_cli import inject

        inject(fault)
    from wandacli.cli.main import main

    sys.argv = ["wandacli", *args]
    main()


class ForkedProcess:
    """The part of subprocess.Popen the reliability tests use, text mode."""

    def __init__(self, args: list[Any], env: dict[str, str], fault: str | None = None) -> None:
        folder = Path(tempfile.mkdtemp(prefix="wandacli-forked-"))
        self._ended_output: tuple[str, str] | None = None
        self._out, self._err = folder / "stdout", folder / "stderr"
        self.args = [str(a) for a in args]
        self._process = _server().Process(
            target=_child, args=(self.args, env, str(self._out), str(self._err), fault)
        )
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self._process.join()
            self._ended(self._process.exitcode)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        if self.returncode is None:
            self._ended(self._process.exitcode)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, number: int) -> None:
        """As Popen does: nothing once the process has ended."""
        if self.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read(self) -> tuple[str, str]:
        read = lambda path: path.read_text(encoding="utf-8") if path.exists() else ""  # noqa: E731
        return read(self._out), read(self._err)

    def _ended(self, code: int | None) -> None:
        """The process is over: its output kept here and its folder removed (thousands of runs
        would otherwise leave thousands of folders in /tmp)."""
        self.returncode = code
        self._ended_output = self._read()
        shutil.rmtree(self._out.parent, ignore_errors=True)

    def output(self) -> tuple[str, str]:
        """What the process wrote: so far, or all of it once it has ended."""
        if self.poll() is not None and self._ended_output is not None:
            return self._ended_output
        return self._read()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()


def run(
    args: list[Any], env: dict[str, str], fault: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `wandacli ARGS` (with a fault injected, if given) to the end, like subprocess.run
    with capture_output=True, text=True."""
    process = ForkedProcess(args, env, fault)
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise subprocess.TimeoutExpired(process.args, timeout)
        time.sleep(0.01)
    stdout, stderr = process.output()
    assert process.returncode is not None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
