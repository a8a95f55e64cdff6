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


REPORT_ONLY = "report only"


@dataclass
class Row:
    """One benchmark figure: a ratio and its target."""

    benchmark: str
    ratio: float
    target: str  # e.g. "<= 1.3"
    detail: str

    @property
    def meets_target(self) -> bool | None:
        """None for figures reported without a target."""
        if self.target == REPORT_ONLY:
            return None
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


def peak_rss_of_command(argv: list[str]) -> int:
    """Peak RSS in bytes of a command run as a user would (a fresh process), measured by a
    watcher process so nothing else is counted."""
    watcher = (
        "import resource, subprocess, sys\n"
        f"done = subprocess.run({argv!r}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "if done.returncode: sys.exit(done.stderr[-2000:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", watcher], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark command failed: {' '.join(argv)}\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1])


BENCH_NSAMPLES = 8  # scores for the prune/compare benchmarks: values matter, not quality


def smollm2_store() -> Path:
    """A store with SmolLM2 score sets (wanda and wandg on align_short, wandg on utility),
    made once per benchmark run."""
    from wandacli.config.score import ScoreConfig
    from wandacli.scoring.run import run_score

    store = WORK / "store"
    for method, data in (("wanda", "align_short"), ("wandg", "align_short"), ("wandg", "utility")):
        if not (store / "scores" / f"{method}-{data}.h5").is_file():
            config = ScoreConfig(method=method, data=data, nsamples=BENCH_NSAMPLES, store=store)
            run_score(config, command_line=["bench"])
    return store
