"""`wandacli search` on the demo's organism (issue: a trial in ≤ 15 s on 2 cores, of which
building and applying the removal ≤ 2 s), measured side by side in one run:

- a set-difference trial's removal (p = q = 0.1, ranked up to 0.2) built from the presorted
  scores and applied in memory, seconds ÷ 2                                target <= 1
- the same mask recomputed from the stored scores as `prune` does (reading both sets and
  selecting per matrix) ÷ the presorted build                            report only
- an orthogonal-projection trial (the paper's Table 7 regime scaled to SmolLM2's widths:
  rank_neg = 14, rank_pos = 92 of 576) from the precomputed bases, seconds ÷ 2   target <= 1
- the direct formula `prune` applies (V_s V_sᵀ W − V_u V_uᵀ …, float64) ÷ the precomputed
  complement formula                                                     report only
- a whole search trial with the defaults (32 search prompts, 24 tokens, 32 harmless prompts
  for the KL cost), seconds ÷ 15                                         target <= 1
"""

from __future__ import annotations

import shutil
import time

import torch

from bench.common import REPORT_ONLY, WORK, Row, timed
from wandacli.config.ranges import ParameterRange
from wandacli.config.settings import ModelSpec
from wandacli.core.console import NullReporter
from wandacli.search.config import SearchConfig

ORGANISM = ModelSpec(model="smollm2-aligned", device="cpu", dtype="float32")
NSAMPLES = 32  # as the demo


def organism_store(methods=("wanda", "actsvd"), spec=ORGANISM, folder="organism-store"):
    """`<method>-<data>` sets of the organism on align_short and utility (the demo's settings),
    made once per benchmark folder."""
    from wandacli.config.score import ScoreConfig
    from wandacli.scoring.run import run_score

    store = WORK / folder
    for method in methods:
        for data in ("align_short", "utility"):
            name = f"{method}-{data}"
            if not (store / "scores" / f"{name}.h5").is_file():
                config = ScoreConfig(
                    method=method,
                    model=spec,
                    data=data,
                    nsamples=NSAMPLES,
                    template="chat",
                    store=store,
                    name=name,
                )
                run_score(config, command_line=["bench"])
    return store


def _removal_seconds(
    config: SearchConfig, params: dict, loaded
) -> tuple[float, float, float, object]:
    """(seconds to prepare once, the first trial's and the median of three trials' seconds of
    build + apply + restore, the removals). The first trial also pays for the allocator's first
    touch of the index arrays."""
    import statistics

    from wandacli.removal.in_memory import WeightChanges
    from wandacli.search.removals import TrialRemovals

    removals = TrialRemovals(config, config.store)
    prepare = timed(lambda: removals.prepare(loaded, NullReporter()))
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        with WeightChanges(loaded) as changes:
            removals.apply(params, changes)
        seconds.append(time.perf_counter() - started)
    return prepare, seconds[0], statistics.median(seconds), removals


def _mask_from_scratch(store) -> None:
    from wandacli.removal.masks import set_difference_mask
    from wandacli.store.files import ScoreSet

    with (
        ScoreSet(store / "scores" / "wanda-align_short.h5") as safety,
        ScoreSet(store / "scores" / "wanda-utility.h5") as utility,
    ):
        for key in safety.keys:
            set_difference_mask(safety.read(key), utility.read(key), 0.1, 0.1)


def _direct_projection(removals, loaded, params) -> None:

    layers = {lin.key: lin for lin in loaded.linear_layers}
    settings = removals.settings(params)
    for key, module in removals._prepared.items():
        ranks = removals.kind.ranks_for(settings, removals.fingerprint.shapes[key])
        bases = {
            "safety": module.safety[:, : ranks["safety"]],
            "utility": module.utility[:, : ranks["utility"]],
        }
        removals.kind.edited_weight(layers[key].weight_matrix().detach(), bases)


def run() -> list[Row]:
    from wandacli.models.loader import load_model
    from wandacli.search.run import run_search

    torch.manual_seed(0)
    store = organism_store()
    loaded = load_model(ORGANISM)
    common = {"model": ORGANISM, "store": store}
    masks = SearchConfig(
        name="bench",
        scores="wanda-align_short",
        utility_scores="wanda-utility",
        p=ParameterRange(0.01, 0.2),
        q=ParameterRange(0.01, 0.2),
        **common,
    )
    mask_prepare, mask_first, mask_trial, _ = _removal_seconds(masks, {"p": 0.1, "q": 0.1}, loaded)
    scratch = timed(lambda: _mask_from_scratch(store))
    projection = SearchConfig(
        name="bench",
        scores="actsvd-align_short",
        utility_scores="actsvd-utility",
        rank_neg=ParameterRange(0, 64, True),
        rank_pos=ParameterRange(0, 192, True),
        **common,
    )
    params = {"rank_neg": 14, "rank_pos": 92}
    edit_prepare, edit_first, edit_trial, removals = _removal_seconds(projection, params, loaded)
    direct = timed(lambda: _direct_projection(removals, loaded, params))
    removals.close()

    shutil.rmtree(store / "searches", ignore_errors=True)
    trials = 3
    result = run_search(
        SearchConfig(
            **{**masks.__dict__, "name": "bench-trials", "trials": trials, "control": False}
        )
    )
    complete = [t for t in result.trials if t["state"] == "COMPLETE"]
    per_trial = sum(t["seconds"] for t in complete) / len(complete)
    removal = sum(t["removal_seconds"] for t in complete) / len(complete)
    shutil.rmtree(store / "searches", ignore_errors=True)
    return [
        Row(
            "search: set-difference trial's removal, seconds ÷ 2",
            mask_trial / 2,
            "<= 1",
            f"{mask_trial:.2f} s per trial, median of 3 (first {mask_first:.2f} s; ranking once: {mask_prepare:.1f} s)",
        ),
        Row(
            "search: the mask recomputed as prune does ÷ presorted",
            scratch / mask_trial,
            REPORT_ONLY,
            f"{scratch:.2f} s against {mask_trial:.2f} s",
        ),
        Row(
            "search: projection trial (rank_neg 14, rank_pos 92), seconds ÷ 2",
            edit_trial / 2,
            "<= 1",
            f"{edit_trial:.2f} s per trial, median of 3 (first {edit_first:.2f} s; bases once: {edit_prepare:.1f} s)",
        ),
        Row(
            "search: projection by prune's direct formula ÷ complement formula",
            direct / edit_trial,
            REPORT_ONLY,
            f"{direct:.2f} s against {edit_trial:.2f} s",
        ),
        Row(
            "search: a whole trial (32 prompts, 24 tokens, 32 KL prompts), seconds ÷ 15",
            per_trial / 15,
            "<= 1",
            f"{per_trial:.1f} s per trial over {len(complete)} (removal {removal:.2f} s)",
        ),
    ]
