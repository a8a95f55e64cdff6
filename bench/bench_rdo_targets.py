"""Refusal direction optimisation (RDO) on the organism with the ablation loss's targets from the
model before alignment (issue #29's untried lever), against RDO as `--direction-optimise` trains
it and against r as it is, side by side in one run:

    .venv/bin/python -m bench.bench_rdo_targets [--layers 20,25] [--steps 20] [--dtype bfloat16]

RDO's ablation loss asks the harmful prompts, with the direction removed, to give target
responses. `--direction-optimise` takes them from the model itself with the starting r removed
(Wollschläger et al.'s recipe when no other model is at hand): where removing r still leaves
refusals, those refusals are the targets. The organism was made from SmolLM2-135M-Instruct
(`smollm2`), which answers nearly every harmful prompt, so its answers are compliant targets
that no edit of the organism has to produce first. This bench trains the direction both ways
(the second by handing the training the pre-alignment model's greedy answers; the other two
losses, the steps and the seed are the same) and measures each direction as one search trial
measures it, with bench_heretic's prompts and measures (AdvBench 101-124, 24 tokens; the 32
`utility-held-out` prompts, first-token KL), r removed at full weight from every writer and the
embedding (run 6's table in docs/demo-and-study.md).

Prints, per layer, the refusal rate and KL of r, of RDO's direction and of RDO's direction with
the pre-alignment targets. A research probe: it reports what it measures, either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any
from unittest import mock

from bench.common import REPORT_ONLY, WORK, Row

PRE_ALIGNMENT = "smollm2"
STANDALONE = True  # four RDO trainings: run_all runs it when named


def trial(store: Any, name: str, layer: int, steps: int, dtype: str) -> dict[str, Any]:
    """One search trial of the direction at `layer`, refined by `steps` of RDO (0: r)."""
    from typer.testing import CliRunner

    from bench.bench_heretic import MEASURES, ORGANISM
    from wandacli.cli import app

    shutil.rmtree(store / "searches" / name, ignore_errors=True)
    args = ["search", "--model", ORGANISM, "--dtype", dtype, "--device", "cpu", "--store",
            str(store), "--name", name, "--scores", "mean-activations-safety",
            "--utility-scores", "mean-activations-utility", "--direction-layer",
            f"{layer}:{layer}", *(["--direction-optimise", f"{steps}:{steps}"] if steps else []),
            "--trials", "1", *MEASURES, "--seed", "0", "--no-control", "--no-progress",
            "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    if result.exit_code != 0:
        sys.exit(f"search {name} failed: {result.stderr}")
    found = json.loads(result.stdout)["trials"][0]
    return {"refusal": found["refusal"], "kl": found["kl"]}


def store_copy(source: Any, name: str) -> Any:
    """A store of its own with the two mean-activations sets (a trained direction is kept in
    its store by what it was trained from, which does not name where its targets came from)."""
    store = WORK / "rdo-targets" / name
    (store / "scores").mkdir(parents=True, exist_ok=True)
    for path in (source / "scores").glob("mean-activations-*.h5"):
        shutil.copy(path, store / "scores" / path.name)
    return store


def main(argv: list[str] | None = None) -> list[Row]:
    from bench.bench_direction_trials import store_with_means
    from wandacli.config.settings import ModelSpec
    from wandacli.models.loader import load_model
    from wandacli.removal import optimised_direction as rdo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="20,25", help="the directions' streams")
    parser.add_argument("--steps", type=int, default=20, help="RDO's steps")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    args = parser.parse_args(argv)
    means = store_with_means()
    pre_alignment = load_model(ModelSpec(model=PRE_ALIGNMENT, dtype=args.dtype, device="cpu"))
    greedy = rdo._greedy

    def pre_alignment_targets(loaded: Any, prompts: Any, tokens: int, pad: int) -> Any:
        # optimise() asks for the harmful prompts' targets first, with the start removed.
        calls.append(1)
        return greedy(pre_alignment if len(calls) == 1 else loaded, prompts, tokens, pad)

    rows, table = [], []
    for layer in (int(v) for v in args.layers.split(",")):
        plain = trial(store_copy(means, f"r-{layer}"), "r", layer, 0, args.dtype)
        own = trial(store_copy(means, f"own-{layer}"), "own", layer, args.steps, args.dtype)
        calls: list[int] = []
        with mock.patch.object(rdo, "_greedy", pre_alignment_targets):
            targets = trial(store_copy(means, f"pre-{layer}"), "pre", layer, args.steps, args.dtype)
        table.append((layer, plain, own, targets))
        for label, measured in (("r", plain), ("RDO", own), ("RDO, pre-alignment", targets)):
            rows.append(
                Row(
                    f"direction at stream {layer}, {label}: refusal rate",
                    measured["refusal"],
                    REPORT_ONLY,
                    f"first-token KL {measured['kl']:.3f}",
                )
            )
    print(f"{'stream':>6}  {'r':>15}  {'RDO':>15}  {'RDO, pre-alignment targets':>27}")
    for layer, *measured in table:
        cells = [f"{m['refusal']:.2f} @ {m['kl']:.3f}" for m in measured]
        print(f"{layer:>6}  {cells[0]:>15}  {cells[1]:>15}  {cells[2]:>27}")
    return rows


def run() -> list[Row]:
    return main([])


if __name__ == "__main__":
    for row in main():
        print(row)
