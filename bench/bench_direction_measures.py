"""Does the first-token refusal score rank refusal *directions* as the sampled ASR does? (issue
#21: add it as a search objective if it does; measure the rank correlation on the organism.)

bench_refusal_measures asks this of masks; here the models under test are the demo's organism
in bfloat16 (as the demo runs it) with one refusal direction removed, r = the difference of the
mean residual streams of align_short and utility prompts (32 each, chat template) at layer l and
the last prompt token, for l in LAYERS, plus the dense organism. Measured side by side in one run:

- on the search prompts (AdvBench 101–132): the refusal rate of a short greedy generation
  (`--refusal generation`) and the refusal score without generation (`--refusal score`);
- on held-out prompts (the first 20 AdvBench behaviours): the sampled ASR, 5 samples at
  temperature 1, 40 new tokens, the keyword judge: any of 5 (the paper's) and the mean.

Rows: Spearman's rank correlation of each measure with each sampled ASR, sign flipped (1 = the
same order)                                                                  report only
"""

from __future__ import annotations

import numpy as np

from bench.bench_refusal_measures import HELD_OUT, _measure
from bench.bench_search import NSAMPLES
from bench.common import REPORT_ONLY, WORK, Row

LAYERS = [8, 10, 12, 14, 16, 18, 19, 20, 21, 22, 23]
POSITION = -1


def _means_store(spec):
    """The two mean-activations sets, made once per benchmark folder."""
    from wandacli.config.score import ScoreConfig
    from wandacli.scoring.run import run_score

    store = WORK / "organism-store-bfloat16"
    for data in ("align_short", "utility"):
        name = f"means-{data}"
        if not (store / "scores" / f"{name}.h5").is_file():
            config = ScoreConfig(
                method="mean-activations",
                model=spec,
                data=data,
                nsamples=NSAMPLES,
                template="chat",
                store=store,
                name=name,
            )
            run_score(config, command_line=["bench"])
    return store


def run() -> list[Row]:
    from wandacli.config.search import ParameterRange, SearchConfig
    from wandacli.config.settings import ModelSpec
    from wandacli.core.console import NullReporter
    from wandacli.evaluation.prompts import model_texts, read_prompts
    from wandacli.models.loader import load_model
    from wandacli.removal.in_memory import WeightChanges
    from wandacli.reporting.compare import spearman
    from wandacli.search.removals import TrialRemovals

    spec = ModelSpec(model="smollm2-aligned", device="cpu", dtype="bfloat16")
    store = _means_store(spec)
    loaded = load_model(spec)
    config = SearchConfig(
        name="bench",
        model=spec,
        store=store,
        scores="means-align_short",
        utility_scores="means-utility",
        direction_layer=ParameterRange(min(LAYERS), max(LAYERS), True),
        direction_position=ParameterRange(POSITION, POSITION, True),
    )
    removals = TrialRemovals(config, store)
    removals.prepare(loaded, NullReporter())
    search = read_prompts("advbench", offset=100, limit=32).texts
    held_out = read_prompts("advbench", limit=HELD_OUT).texts
    search_texts, special = model_texts(loaded.tokenizer, search, "chat")
    held_texts, held_special = model_texts(loaded.tokenizer, held_out, "chat")
    measured = {"dense": _measure(loaded, search_texts, special, held_texts, held_special)}
    for layer in LAYERS:
        params = {"direction_layer": layer, "direction_position": POSITION}
        with WeightChanges(loaded) as changes:
            removals.apply(params, changes)
            measured[f"l{layer}"] = _measure(
                loaded, search_texts, special, held_texts, held_special
            )
    removals.close()
    labels = list(measured)
    table = "; ".join(
        f"{label}: gen {m['generation']:.2f}, score {m['score']:.2f}, any5 {m['any5']:.2f}, "
        f"mean {m['mean']:.2f}"
        for label, m in measured.items()
    )
    rows = []
    for measure in ("generation", "score"):
        for target in ("any5", "mean"):
            a = np.array([-measured[label][measure] for label in labels])
            b = np.array([measured[label][target] for label in labels])
            rows.append(
                Row(
                    f"direction refusal measure: Spearman of -{measure} with sampled ASR ({target})",
                    spearman(a, b),
                    REPORT_ONLY,
                    f"{len(labels)} models (dense, directions at layers {LAYERS[0]}-{LAYERS[-1]})"
                    + (f" — {table}" if measure == "score" and target == "mean" else ""),
                )
            )
    return rows


if __name__ == "__main__":
    for result in run():
        print(f"{result.benchmark}: {result.ratio:.2f} ({result.detail})")
