"""Helpers shared by the benchmark scripts: timing, peak memory of a fresh process, result rows.

Benchmarks print ratios measured side by side in one run; nothing here is a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "work"


@dataclass
class Row:
    """One benchmark figure: a ratio and its target."""

    benchmark: str
    ratio: float
    target: str  # e.g. "<= 1.3"
    detail: str

    @property
    def meets_target(self) -> bool:
        op, value = self.target.split()
        return self.ratio <= float(value) if op == "<=" else self.ratio >= float(value)

    def to_json(self) -> dict:
        return {**asdict(self), "meets_target": self.meets_target}


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def peak_rss_of(code: str) -> tuple[int, dict]:
    """Run `code` in a fresh Python process; it must print one JSON object as its last line.
    Returns (that process's peak RSS in bytes, the object)."""
    env = {**os.environ, "WANDACLI_QUIET": "1"}
    wrapper = (
        code
        + "\nimport resource, json as _j\n"
        + "print(_j.dumps({**_result, '_peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, env=env, cwd=REPO
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    return int(payload.pop("_peak_rss")), payload


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"
