"""The demo's model organism (issue: the demo shows the paper's effect on a CPU):

- seconds to build `smollm2-aligned` from the converted SmolLM2 (fine-tuning and saving), and
  its training steps per second                                          report only
- `make demo` from an empty output folder (the aligned model cached), minutes ÷ the 20-minute
  budget                                                                 target <= 1
"""

from __future__ import annotations

import shutil
import subprocess
import time

from bench.common import REPO, REPORT_ONLY, WORK, Row

DEMO_BUDGET_MINUTES = 20


def _build_seconds() -> tuple[float, float]:
    import json

    from wandacli.core.console import NullReporter
    from wandacli.models.gguf import ensure_converted_gguf
    from wandacli.models.organism import DEFAULT_RECIPE, RECIPE_FILE, ensure_aligned_model
    from wandacli.models.sources import default_model_gguf

    work = WORK / "organism"
    shutil.rmtree(work, ignore_errors=True)
    base = shutil.copytree(ensure_converted_gguf(default_model_gguf()), work / "smollm2")
    started = time.perf_counter()
    target = ensure_aligned_model(base, DEFAULT_RECIPE, reporter=NullReporter())
    seconds = time.perf_counter() - started
    train_seconds = json.loads((target / RECIPE_FILE).read_text())["train_seconds"]
    shutil.rmtree(work, ignore_errors=True)
    return seconds, DEFAULT_RECIPE.steps / train_seconds


def _demo_minutes() -> float:
    out = WORK / "demo"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run(
        ["make", "--no-print-directory", "pipeline", f"OUT={out}", "NEEDS_INSTALL="],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"make demo failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return (time.perf_counter() - started) / 60


def run() -> list[Row]:
    seconds, steps_per_second = _build_seconds()
    minutes = _demo_minutes()
    return [
        Row(
            "organism: seconds to build smollm2-aligned",
            seconds,
            REPORT_ONLY,
            f"{seconds:.0f} s ({steps_per_second:.2f} training steps/s)",
        ),
        Row(
            f"demo: make demo minutes / {DEMO_BUDGET_MINUTES}-minute budget (aligned model cached)",
            minutes / DEMO_BUDGET_MINUTES,
            "<= 1",
            f"{minutes:.1f} min",
        ),
    ]
