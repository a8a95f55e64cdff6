"""The refusal direction's statistics on the demo's organism (issue #21 benchmark):

- `score --method mean-activations` time ÷ a bare forward over the same prompts (64 align_short
  prompts in the chat template)                                             target <= 1.2
- a direction edit from the store (`prune --direction-layer`) ÷ reading the two sets'
  means                                                                     report only

The score time covers the run after model loading: data, the forward passes with
output_hidden_states, the float64 sums, checkpoints, the file write. The bare forward is the
same prompts through the same model, logits of the last position only, nothing kept.
"""

from __future__ import annotations

import shutil

import torch

from bench.common import REPORT_ONLY, WORK, Row, timed

NSAMPLES = 64
DATA = "align_short"


def run() -> list[Row]:
    from wandacli.config.score import ScoreConfig
    from wandacli.config.settings import ModelSpec
    from wandacli.data.calibration import build_prompt_samples
    from wandacli.data.sources import load_raw
    from wandacli.models.loader import load_model
    from wandacli.scoring.run import run_score

    loaded = load_model(ModelSpec(model="smollm2-aligned", device="cpu", dtype="float32"))
    prompts = build_prompt_samples(
        load_raw(DATA), loaded.tokenizer, nsamples=NSAMPLES, seed=0, template="chat", positions=5
    )
    store = WORK / "mean-activations-store"
    shutil.rmtree(store, ignore_errors=True)
    config = ScoreConfig(
        method="mean-activations",
        model=ModelSpec(model="smollm2-aligned", device="cpu", dtype="float32"),
        data=DATA,
        nsamples=NSAMPLES,
        template="chat",
        store=store,
        overwrite=True,
    )

    def bare() -> None:
        with torch.no_grad():
            for sample in prompts.samples:
                loaded.model(input_ids=sample.input_ids, use_cache=False, logits_to_keep=1)

    bare()  # warm-up
    bare_seconds = timed(bare)
    score_seconds = timed(lambda: run_score(config, loaded=loaded, command_line=["bench"]))
    tokens = sum(int(s.input_ids.shape[1]) for s in prompts.samples)
    harmless = ScoreConfig(**{**config.__dict__, "data": "utility", "name": "harmless"})
    run_score(harmless, loaded=loaded, command_line=["bench"])
    edit_seconds, read_seconds = _direction_edit(store)
    return [
        Row(
            "mean-activations score / bare forward (64 prompts, organism)",
            score_seconds / bare_seconds,
            "<= 1.2",
            f"{score_seconds:.2f} s vs {bare_seconds:.2f} s over {tokens} prompt tokens",
        ),
        Row(
            "direction edit from the store / reading the two sets",
            edit_seconds / read_seconds,
            REPORT_ONLY,
            f"{edit_seconds * 1000:.0f} ms vs {read_seconds * 1000:.0f} ms",
        ),
    ]


def _direction_edit(store) -> tuple[float, float]:
    from wandacli.removal.request import removal_request
    from wandacli.removal.run import run_removal
    from wandacli.store.files import MeanActivations

    def read() -> None:
        for name in ("mean-activations-align_short", "harmless"):
            with MeanActivations(store / "scores" / f"{name}.h5") as means:
                means.means()

    request = removal_request(
        {
            "scores": "mean-activations-align_short",
            "utility_scores": "harmless",
            "store": store,
            "direction_layer": 20,
            "name": "bench-direction",
            "overwrite": True,
        }
    )
    read()  # warm the page cache for both
    return timed(lambda: run_removal(request, command_line=["bench"])), timed(read)


if __name__ == "__main__":
    for result in run():
        print(f"{result.benchmark}: {result.ratio:.2f} (target {result.target}; {result.detail})")
