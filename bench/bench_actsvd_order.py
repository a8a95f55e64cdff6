"""How far the store-first order of rank edits is from the reference's sequential order, on the
demo's model organism (`smollm2-aligned`), for docs/reference-differences.md:

- per module, the subspace similarity φ of the safety bases V_s the two orders find
  (store-first: every layer's second moments from the unedited model; sequential: each layer's
  recorded after the layers before it were edited);
- the perplexity and ASR of the model edited each way, and of the dense organism.

The edit is the orthogonal projection with the reference's parametrisation scaled to SmolLM2
(rank_neg = rank_pos = 144 of 576, the reference's 1024 of 4096), statistics from 32 samples of
align_short (safety) and the shipped utility set, in the chat template as the demo scores.
Evaluation as in the demo: 50 AdvBench prompts, greedy, no system prompt, chat template, 40 new
tokens; perplexity on the first 8 windows of 256 WikiText-2 tokens. Reported, no targets.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import torch

from bench.common import REPORT_ONLY, WORK, Row

MODEL = "smollm2-aligned"
NSAMPLES = 32
RANK_NEG = RANK_POS = 144


def _spec():
    from wandacli.config.settings import ModelSpec

    return ModelSpec(model=MODEL, device="cpu", dtype="float32")


def _statistics(store) -> None:
    from wandacli.config.score import ScoreConfig
    from wandacli.scoring.run import run_score

    for data in ("align_short", "utility"):
        config = ScoreConfig(
            method="actsvd",
            model=_spec(),
            data=data,
            nsamples=NSAMPLES,
            store=store,
            template="chat",
        )
        run_score(config, command_line=["bench"])


def _edit(store, sequential: bool) -> str:
    import dataclasses

    from wandacli.removal.run import prune

    options = {
        "scores": "actsvd-align_short",
        "utility_scores": "actsvd-utility",
        "store": store,
        **dataclasses.asdict(_spec()),
        "rank_neg": RANK_NEG,
        "rank_pos": RANK_POS,
        "sequential": sequential,
    }
    return prune(options, command_line=["bench"]).name


def _evaluate(store, edit: str | None) -> tuple[float, float]:
    from wandacli.config.evaluation import AttackConfig, UtilityConfig
    from wandacli.evaluation.attack import run_attack
    from wandacli.evaluation.utility import run_utility

    out = WORK / "actsvd-order" / "results" / (edit or "dense")
    attack = run_attack(
        AttackConfig(
            model=_spec(),
            removal=edit,
            store=store,
            limit=50,
            configs=("basic_nosys",),
            inst=(True,),
            template="chat",
            max_new_tokens=40,
            batch_size=25,
            out=out,
            overwrite=True,
        )
    )
    utility = run_utility(
        UtilityConfig(
            model=_spec(), removal=edit, store=store, seqlen=256, limit_windows=8, out=out
        )
    )
    assert utility.perplexity is not None
    return attack.summaries[0].asr, utility.perplexity


def run() -> list[Row]:
    from wandacli.removal.ranks import subspace_similarity
    from wandacli.store.files import EditFile

    store = WORK / "actsvd-order" / "store"
    shutil.rmtree(store.parent, ignore_errors=True)
    _statistics(store)
    store_first, sequential = _edit(store, False), _edit(store, True)
    similarities = {}
    with (
        EditFile(store / "edits" / f"{store_first}.h5") as a,
        EditFile(store / "edits" / f"{sequential}.h5") as b,
    ):
        for key in a.keys:
            v_a = torch.from_numpy(a.bases(key)["safety"]).double()
            v_b = torch.from_numpy(b.bases(key)["safety"]).double()
            similarities[key] = subspace_similarity(v_a, v_b)
        removed = (a.meta["removed_rank_fraction"], b.meta["removed_rank_fraction"])
    by_layer = {}
    for key, value in similarities.items():
        by_layer.setdefault(int(key.split("/")[0]), []).append(value)
    dense = _evaluate(store, None)
    first = _evaluate(store, store_first)
    seq = _evaluate(store, sequential)
    values = np.array(list(similarities.values()))
    last = max(by_layer)
    return [
        Row(
            "actsvd order: φ(V_s store-first, V_s sequential), mean over modules",
            float(values.mean()),
            REPORT_ONLY,
            f"min {values.min():.3f}; layer 0 {np.mean(by_layer[0]):.3f}, layer {last} "
            f"{np.mean(by_layer[last]):.3f}; rank removed {100 * removed[0]:.2f}% vs "
            f"{100 * removed[1]:.2f}%",
        ),
        Row(
            "actsvd order: ASR sequential − store-first",
            seq[0] - first[0],
            REPORT_ONLY,
            f"ASR dense {dense[0]:.2f}, store-first {first[0]:.2f}, sequential {seq[0]:.2f}",
        ),
        Row(
            "actsvd order: perplexity sequential / store-first",
            seq[1] / first[1],
            REPORT_ONLY,
            f"ppl dense {dense[1]:.2f}, store-first {first[1]:.2f}, sequential {seq[1]:.2f}",
        ),
    ]


if __name__ == "__main__":
    for row in run():
        print(f"{row.benchmark}: {row.ratio:.3f} ({row.detail})", file=sys.stdout)
