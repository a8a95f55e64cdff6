"""A direction search's trial on the demo's organism, the work it can skip skipped, against the
whole measure (issue #29: a trial at most a tenth of heretic's), side by side in one run:

    .venv/bin/python -m bench.bench_direction_trials [--trials 12] [--dtype bfloat16]

The runs are the same search in heretic's space (bench_heretic's `--space heretic`: the study's
`direction-rich` ranges with what heretic fixes fixed), with bench_heretic's prompts and
measures (AdvBench 101-124, 24 tokens; 32 `utility-held-out` prompts, first-token KL), float32
(or `--dtype`), the same seed, every trial random, so that all measure the same trials:

- as `wandacli search` runs it: each trial's KL and its refusal prompts' pass from its first
  changed layer on the dense stream recorded there (evaluation/lower_layers.py), the prompts'
  shared opening run once a measure (evaluation/prefix.py), each response stopped at its first
  refusal phrase and each row leaving its batch once decided (evaluation/refusal.py);
- the whole measure: every layer on every trial, every response to its 24 tokens;
- as `wandacli search` runs it with the KL's batches padded to their longest prompt, as
  before they were packed (evaluation/prefix.py);
- the floor of a trial: `--refusal score` (no generation, the refusal-direction paper's
  score) beside the same KL, which is what is left once nothing is generated.

Prints the seconds of each, the ratios of the first to the second and to the third, whether
they measured every trial the same, and each trial against heretic's in the same dtype
(bench_heretic's median on this machine: float32 27.4 s, run 12; bfloat16, run 14).
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

# bench_heretic's median seconds a heretic 1.4.0 trial on this machine (2 cores, its 100-token
# responses), by dtype: float32 run 12, bfloat16 run 14 (2026-12-05, docs/demo-and-study.md).
HERETIC_TRIAL_SECONDS = {"float32": 27.4, "bfloat16": 20.7}


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


def search(
    store: Any,
    name: str,
    trials: int,
    dtype: str,
    *,
    whole: bool,
    refusal: str = "generation",
    padded: bool = False,
) -> dict[str, Any]:
    """The search in-process (`whole`: the lower layers run and the responses run out;
    `refusal`: search --refusal; `padded`: the KL's batches padded, as before they were
    packed)."""
    from typer.testing import CliRunner

    from bench.bench_heretic import MEASURES, ORGANISM, heretic_space, rich_search, search_flags
    from wandacli.cli import app
    from wandacli.evaluation import divergence, lower_layers
    from wandacli.search import objectives

    shutil.rmtree(store / "searches" / name, ignore_errors=True)
    space = heretic_space(rich_search())
    # Every trial is random, so what TPE would be told changes nothing; heretic's objective
    # divides refusal rates, which a score is not.
    objective = "heretic" if refusal == "generation" else "wandacli"
    args = ["search", "--model", ORGANISM, "--dtype", dtype, "--device", "cpu", "--store",
            str(store), "--name", name, "--scores", space["scores"], "--utility-scores",
            space["utility_scores"], *search_flags(space), "--trials", str(trials),
            "--startup-trials", str(trials), "--objective", objective, *MEASURES, "--seed", "0",
            "--no-control", "--no-progress", "--json", "--refusal", refusal]  # fmt: skip
    with ExitStack() as patches:
        if padded:
            patches.enter_context(
                mock.patch.object(divergence, "packing_unsupported", lambda *a: "the bench")
            )
        if whole:
            whole_pass = lower_layers.unusable("the bench's whole measure")
            patches.enter_context(
                mock.patch.object(lower_layers, "record_streams", lambda *a, **k: whole_pass)
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
    parser.add_argument("--dtype", choices=tuple(HERETIC_TRIAL_SECONDS), default="float32")
    args = parser.parse_args(argv)
    store = store_with_means()
    skipping = search(store, "skipping", args.trials, args.dtype, whole=False)
    # The same trials with the KL's batches padded to their longest prompt (before packing).
    padded = search(store, "padded", args.trials, args.dtype, whole=False, padded=True)
    whole = search(store, "whole", args.trials, args.dtype, whole=True)
    # The floor of a trial: no generation at all (the refusal-direction paper's score).
    scored = search(store, "no-generation", args.trials, args.dtype, whole=False, refusal="score")

    def measured(found: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(t["params"], t["refusal"], t["kl"]) for t in found["trials"]]

    def seconds(found: dict[str, Any]) -> list[float]:
        return [t["seconds"] for t in found["trials"]]

    same = measured(skipping) == measured(whole)
    fast, slow, floor = seconds(skipping), seconds(whole), seconds(scored)
    # Packed and padded batches round differently in bfloat16: the KLs agree to its rounding
    # (in nats: relative to a KL near 0 it says little).
    kl_moved = max(
        abs(ours["kl"] - theirs["kl"])
        for ours, theirs in zip(skipping["trials"], padded["trials"], strict=True)
    )
    same_refusals = [t["refusal"] for t in skipping["trials"]] == [
        t["refusal"] for t in padded["trials"]
    ]
    print(f"{'trial':>5} {'refusal':>8} {'KL':>8} {'whole s':>8} {'skipping s':>10} "
          f"{'score':>7} {'no-generation s':>15}")  # fmt: skip
    for trial, slow_s, score in zip(skipping["trials"], slow, scored["trials"], strict=True):
        print(f"{trial['index']:>5} {trial['refusal']:>8.3f} {trial['kl']:>8.4f} "
              f"{slow_s:>8.2f} {trial['seconds']:>10.2f} {score['refusal']:>7.2f} "
              f"{score['seconds']:>15.2f}")  # fmt: skip
    print(f"median {statistics.median(slow):.2f} s whole, {statistics.median(fast):.2f} s "
          f"skipping, {statistics.median(floor):.2f} s with no generation; every trial "
          f"measured the same whole and skipping: {same}")  # fmt: skip
    heretic = HERETIC_TRIAL_SECONDS[args.dtype]

    def against_heretic(label: str, times: list[float]) -> Row:
        median = statistics.median(times)
        return Row(
            f"direction trial ({label}, {args.dtype}) ÷ heretic's ({heretic} s, bench_heretic)",
            median / heretic,
            REPORT_ONLY,
            f"median {median:.2f} s (issue #29's goal: <= 0.1)",
        )

    return [
        Row(
            f"direction trial: the KL's batches packed ÷ padded (the same trials, {args.dtype})",
            sum(fast) / sum(seconds(padded)),
            "<= 1",
            f"{sum(fast):.1f} s against {sum(seconds(padded)):.1f} s over {len(fast)} trials; "
            f"the same refusals: {same_refusals}; KLs up to {kl_moved:.4f} apart",
        ),
        Row(
            f"direction trial: skipping ÷ the whole measure (the same trials, {args.dtype})",
            sum(fast) / sum(slow),
            "<= 1",
            f"{sum(fast):.1f} s against {sum(slow):.1f} s over {len(fast)} trials; "
            f"the same values: {same}",
        ),
        against_heretic("search's refusal rate", fast),
        against_heretic("--refusal score, no generation", floor),
    ]


def run() -> list[Row]:
    return main([])


if __name__ == "__main__":
    for row in main():
        print(f"{row.benchmark}: {row.ratio:.3f} (target {row.target}) {row.detail}")
