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

from bench.bench_refusal_measures import correlation_rows, measurer
from bench.bench_search import organism_store
from bench.common import Row

LAYERS = [8, 10, 12, 14, 16, 18, 19, 20, 21, 22, 23]
POSITION = -1


def run() -> list[Row]:
    from wandacli.config.ranges import ParameterRange
    from wandacli.config.settings import ModelSpec
    from wandacli.core.console import NullReporter
    from wandacli.models.loader import load_model
    from wandacli.removal.in_memory import WeightChanges
    from wandacli.search.config import SearchConfig
    from wandacli.search.removals import TrialRemovals

    spec = ModelSpec(model="smollm2-aligned", device="cpu", dtype="bfloat16")
    store = organism_store(("mean-activations",), spec, "organism-store-bfloat16")
    loaded = load_model(spec)
    config = SearchConfig(
        name="bench",
        model=spec,
        store=store,
        scores="mean-activations-align_short",
        utility_scores="mean-activations-utility",
        direction_layer=ParameterRange(min(LAYERS), max(LAYERS), True),
        direction_position=ParameterRange(POSITION, POSITION, True),
    )
    removals = TrialRemovals(config, store)
    removals.prepare(loaded, NullReporter())
    measure = measurer(loaded)
    measured = {"dense": measure()}
    for layer in LAYERS:
        params = {"direction_layer": layer, "direction_position": POSITION}
        with WeightChanges(loaded) as changes:
            removals.apply(params, changes)
            measured[f"l{layer}"] = measure()
    removals.close()
    models = f"{len(measured)} models (dense, directions at layers {LAYERS[0]}-{LAYERS[-1]})"
    return correlation_rows(measured, "direction refusal measure", models)
