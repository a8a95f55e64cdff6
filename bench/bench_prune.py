"""`wandacli prune` on SmolLM2's store, against the work it cannot avoid, side by side
(prune issue targets):

- 50% per-row mask, read to written ÷ (reading the scores + one stable torch.sort(dim=-1))
                                                                          target <= 1.2
- set difference p = q = 0.1 ÷ (reading both sets + one torch.topk per set per matrix)
                                                                          target <= 1.5
- peak RSS of `wandacli prune` (no --save-model) ÷ (3 × largest score array + 300 MB)
                                                                          target <= 1
"""

from __future__ import annotations

import shutil
import sys

import torch

from bench.common import Row, mib, peak_rss_of_command, smollm2_store, timed
from wandacli.removal.run import prune
from wandacli.store.files import ScoreSet

SAFETY, UTILITY, WANDA = "wandg-align_short", "wandg-utility", "wanda-align_short"


def _read_and_sort(store) -> None:
    with ScoreSet(store / "scores" / f"{WANDA}.h5") as score_set:
        for key in score_set.keys:
            torch.sort(torch.from_numpy(score_set.read(key)), dim=-1, stable=True)


def _read_and_topk(store) -> None:
    with (
        ScoreSet(store / "scores" / f"{SAFETY}.h5") as safety,
        ScoreSet(store / "scores" / f"{UTILITY}.h5") as utility,
    ):
        for key in safety.keys:
            for score_set in (safety, utility):
                flat = torch.from_numpy(score_set.read(key)).flatten()
                torch.topk(flat, int(0.1 * flat.numel()), largest=True)


def _prune(store, **options) -> None:
    prune({"store": store, "overwrite": True, **options}, command_line=["bench"])


def run() -> list[Row]:
    store = smollm2_store()
    _read_and_sort(store)  # warm the page cache for both sides

    baseline_row = timed(lambda: _read_and_sort(store))
    row = timed(lambda: _prune(store, scores=WANDA, sparsity_ratio=0.5))
    baseline_row = min(baseline_row, timed(lambda: _read_and_sort(store)))
    row = min(row, timed(lambda: _prune(store, scores=WANDA, sparsity_ratio=0.5)))

    baseline_diff = timed(lambda: _read_and_topk(store))
    diff = timed(lambda: _prune(store, scores=SAFETY, utility_scores=UTILITY, p=0.1, q=0.1))
    baseline_diff = min(baseline_diff, timed(lambda: _read_and_topk(store)))
    diff = min(
        diff, timed(lambda: _prune(store, scores=SAFETY, utility_scores=UTILITY, p=0.1, q=0.1))
    )

    with ScoreSet(store / "scores" / f"{WANDA}.h5") as score_set:
        largest = max(a * b for a, b in score_set.fingerprint.shapes.values()) * 4
    budget = 3 * largest + 300 * (1 << 20)
    command = [
        str(shutil.which("wandacli") or sys.executable),
        "prune",
        "--store",
        str(store),
        "--scores",
        WANDA,
        "--sparsity-ratio",
        "0.5",
        "--overwrite",
        "--no-progress",
        "--name",
        "bench-rss",
    ]
    if not shutil.which("wandacli"):
        command[1:1] = ["-m", "wandacli"]
    peak = peak_rss_of_command(command)
    return [
        Row(
            "prune: 50% per-row mask / (read + stable sort)",
            row / baseline_row,
            "<= 1.2",
            f"{row:.2f} s vs {baseline_row:.2f} s",
        ),
        Row(
            "prune: set difference p=q=0.1 / (read both + topk)",
            diff / baseline_diff,
            "<= 1.5",
            f"{diff:.2f} s vs {baseline_diff:.2f} s",
        ),
        Row(
            "prune: peak RSS / (3 x largest array + 300 MB)",
            peak / budget,
            "<= 1",
            f"{mib(peak)} vs {mib(budget)}",
        ),
    ]


if __name__ == "__main__":
    for result in run():
        print(f"{result.benchmark}: {result.ratio:.2f} (target {result.target}; {result.detail})")
