"""A direction search's trial on the demo's organism, the work it can skip skipped, against the
whole measure (issue #29: a trial at most a tenth of heretic's), side by side in one run:

    .venv/bin/python -m bench.bench_direction_trials [--trials 12]

Both runs are the same search in heretic's space (bench_heretic's `--space heretic`: the
study's `direction-rich` ranges with what heretic fixes fixed), with bench_heretic's prompts and
measures (AdvBench 101-124, 24 tokens; 32 `utility-held-out` prompts, first-token KL), float32,
the same seed, every trial random, so that both measure the same trials:

- as `wandacli search` runs it: each trial's KL from its first changed layer on the dense
  stream recorded there (evaluation/lower_layers.py), each response stopped at its first
  refusal phrase and each batch once all are decided (evaluation/refusal.py);
- the whole measure: every layer on every trial, every response to its 24 tokens.

Prints the seconds of each, their ratio, whether every trial measured the same, and the trial
against heretic's 27.4 s (bench_heretic's median on this machine, run 12, 2026-12-05).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from contextlib import ExitStack
from typing import Any
from unittest import mock

from bench.common import REPORT_ONLY, WORK, Row

# bench_heretic's median seconds a heretic 1.4.0 trial on this machine (2 cores, float32, its
# 100-token responses), 2026-12-05 (docs/demo-and-study.md, run 12).
HERETIC_TRIAL_SECONDS = 27.4


def store_with_means() -> Any:
    """The organism's two mean-activations sets, as bench_heretic scores them."""
    from bench.bench_heretic import DEMO_CONFIG, wandacli

    store = WORK / "direction-trials"
    store.mkdir(parents=True, exist_ok=True)
    for data, name in (("align_short", "safety"), ("utility", "utility")):
        if not (store / "scores" / f"mean-activations-{name}.h5").is_file():
            wandacli("score", "--config", str(DEMO_CONFIG), "--store", str(store), "--method",
                     "mean-activations", "--data", data, "--name", f"mean-activations-{name}",
                     "--overwrite", log=store / "bench.log")  # fmt: skip
    return store


def search(store: Any, name: str, trials: int, *, whole: bool) -> dict[str, Any]:
    """The search in-process (`whole`: the lower layers run and the responses run out)."""
    from typer.testing import CliRunner

    from bench.bench_heretic import MEASURES, ORGANISM, heretic_space, rich_search, search_flags
    from wandacli.cli import app
    from wandacli.evaluation import divergence, lower_layers
    from wandacli.search import objectives

    shutil.rmtree(store / "searches" / name, ignore_errors=True)
    space = heretic_space(rich_search())
    args = ["search", "--model", ORGANISM, "--dtype", "float32", "--device", "cpu", "--store",
            str(store), "--name", name, "--scores", space["scores"], "--utility-scores",
            space["utility_scores"], *search_flags(space), "--trials", str(trials),
            "--startup-trials", str(trials), "--objective", "heretic", *MEASURES, "--seed", "0",
            "--no-control", "--no-progress", "--json"]  # fmt: skip
    with ExitStack() as patches:
        if whole:
            whole_pass = lower_layers.unusable("the bench's whole measure")
            patches.enter_context(
                mock.patch.object(divergence, "record_streams", lambda *a, **k: whole_pass)
            )
            rate = objectives.refusal_rate
            patches.enter_context(
                mock.patch.object(
                    objectives,
                    "refusal_rate",
                    lambda *a, **k: rate(*a, **(k | {"stop_at_phrase": False})),
                )
            )
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    if result.exit_code != 0:
        sys.exit(f"search {name} failed: {result.stderr}")
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="random trials in each run")
    args = parser.parse_args(argv)
    store = store_with_means()
    skipping = search(store, "skipping", args.trials, whole=False)
    whole = search(store, "whole", args.trials, whole=True)

    def measured(found: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(t["params"], t["refusal"], t["kl"]) for t in found["trials"]]

    same = measured(skipping) == measured(whole)
    fast = [t["seconds"] for t in skipping["trials"]]
    slow = [t["seconds"] for t in whole["trials"]]
    median = statistics.median(fast)
    print(f"{'trial':>5} {'refusal':>8} {'KL':>8} {'whole s':>8} {'skipping s':>10}")
    for trial, seconds in zip(skipping["trials"], slow, strict=True):
        print(f"{trial['index']:>5} {trial['refusal']:>8.3f} {trial['kl']:>8.4f} "
              f"{seconds:>8.2f} {trial['seconds']:>10.2f}")  # fmt: skip
    print(f"median {statistics.median(slow):.2f} s whole, {median:.2f} s skipping; every "
          f"trial measured the same: {same}")  # fmt: skip
    return [
        Row(
            "direction trial: skipping ÷ the whole measure (the same trials)",
            sum(fast) / sum(slow),
            "<= 1",
            f"{sum(fast):.1f} s against {sum(slow):.1f} s over {len(fast)} trials; "
            f"the same values: {same}",
        ),
        Row(
            "direction trial ÷ heretic's (27.4 s, bench_heretic run 12)",
            median / HERETIC_TRIAL_SECONDS,
            REPORT_ONLY,
            f"median {median:.2f} s (issue #29's goal: <= 0.1)",
        ),
    ]


def run() -> list[Row]:
    return main([])


if __name__ == "__main__":
    for row in main():
        print(f"{row.benchmark}: {row.ratio:.3f} (target {row.target}) {row.detail}")
