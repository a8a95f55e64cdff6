"""Data-parallel scoring (scale-out issue): wandg on SmolLM2, 16 samples of align_short, on
2 CPU processes (torchrun, gloo) against 1 process, side by side. Reported, no target: this
machine has 2 cores, so the point is correctness and the GPU path, not speed here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from bench.common import REPORT_ONLY, WORK, Row

NSAMPLES = 16


def _seconds(command: list[str]) -> float:
    env = {**os.environ, "WANDACLI_QUIET": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout[done.stdout.index("{") :])["seconds"])


def run() -> list[Row]:
    args = [
        "score",
        "--method",
        "wandg",
        "--data",
        "align_short",
        "--nsamples",
        str(NSAMPLES),
        "--device",
        "cpu",
        "--no-progress",
        "--json",
        "--overwrite",
    ]
    one = [sys.executable, "-m", "wandacli", *args, "--store", str(WORK / "dist-1")]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "wandacli",
        *args,
        "--store",
        str(WORK / "dist-2"),
    ]
    single = _seconds(one)
    parallel = _seconds(two)
    single = min(single, _seconds(one))
    parallel = min(parallel, _seconds(two))
    shutil.rmtree(WORK / "dist-1", ignore_errors=True)
    shutil.rmtree(WORK / "dist-2", ignore_errors=True)
    return [
        Row(
            "score: wandg time, 2 processes / 1 process",
            parallel / single,
            REPORT_ONLY,
            f"{parallel:.1f} s vs {single:.1f} s, {NSAMPLES} samples, {os.cpu_count()} CPU cores",
        ),
    ]


if __name__ == "__main__":
    for result in run():
        print(f"{result.benchmark}: {result.ratio:.2f} ({result.detail})")
