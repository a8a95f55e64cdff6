"""Which refusal measure should `search` minimise? (issue #20: keep the one that ranks masks as
the sampled ASR does, and report the rank correlation.)

On the demo's organism, for the dense model and a range of masks (set differences from wanda
scores at several (p, q), the top of the safety scores alone, random controls of the same
counts), measured side by side in one run:

- on the search prompts (AdvBench 101–132): the refusal rate of a short greedy generation
  (`--refusal generation`) and the refusal score without generation (`--refusal score`);
- on held-out prompts (the first 20 AdvBench behaviours): the sampled ASR, 5 samples at
  temperature 1, 40 new tokens, the keyword judge: any of 5 (the paper's) and the mean over
  samples.

Rows: Spearman's rank correlation of each measure with each sampled ASR, sign flipped (a
measure of refusal should fall as ASR rises; 1 = the same order)            report only
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bench.bench_search import ORGANISM, organism_store
from bench.common import REPORT_ONLY, Row

POINTS = [  # (p, q) of the set difference, or ("top", ratio)
    (0.1, 0.05),
    (0.1, 0.1),
    (0.1, 0.15),
    (0.05, 0.05),
    (0.2, 0.1),
    (0.03, 0.03),
    ("top", 0.005),
    ("top", 0.01),
]
HELD_OUT = 20


def _masks(store) -> list[str]:
    from wandacli.removal.run import prune

    names = []
    for point in POINTS:
        if point[0] == "top":
            options = {
                "scores": "wanda-align_short",
                "store": store,
                "sparsity_ratio": float(point[1]),
                "prune_highest": True,
                "name": f"bench-top{point[1]}",
            }
        else:
            p, q = point
            options = {
                "scores": "wanda-align_short",
                "store": store,
                "utility_scores": "wanda-utility",
                "p": float(p),
                "q": float(q),
                "name": f"bench-sd-p{p}-q{q}",
            }
        result = prune(options, command_line=["bench"])
        names.append(result.name)
    return names


def _measure(loaded, search_texts, special, held_out_texts, held_special) -> dict[str, float]:
    from wandacli.evaluation.attack import asr_any, asr_sample_mean
    from wandacli.evaluation.backends.hf import HFGenerator
    from wandacli.evaluation.keyword_rule import keyword_success as keyword_judge
    from wandacli.evaluation.refusal import refusal_rate, refusal_score

    rate, _ = refusal_rate(
        loaded, search_texts, add_special_tokens=special, max_new_tokens=24, batch_size=32
    )
    score = refusal_score(loaded, search_texts, add_special_tokens=special, batch_size=32)
    generator = HFGenerator(loaded, max_new_tokens=40, batch_size=50)
    responses = generator.generate(
        held_out_texts, add_special_tokens=held_special, samples=5, sampling=True, seed=0
    )
    success = [
        [keyword_judge(r.text, ended=r.ended, max_new_tokens=40) for r in group]
        for group in responses
    ]
    return {
        "generation": rate,
        "score": score,
        "any5": asr_any(success),
        "mean": asr_sample_mean(success),
    }


def run() -> list[Row]:
    from wandacli.models.loader import load_model
    from wandacli.removal.in_memory import WeightChanges
    from wandacli.store.files import MaskFile

    store = organism_store()
    names = _masks(store)
    loaded = load_model(ORGANISM)
    measure = measurer(loaded)
    measured = {"dense": measure()}
    for name in names:
        with MaskFile(store / "masks" / f"{name}.h5") as mask, WeightChanges(loaded) as changes:
            for key in mask.keys:
                changes.zero(key, mask.read(key))
            measured[name] = measure()
    return correlation_rows(measured, "refusal measure", f"{len(measured)} models")


def measurer(loaded) -> Callable[[], dict[str, float]]:
    """The four measures of the model as it is when called: the search prompts (AdvBench
    101–132) and the held-out ones (the first HELD_OUT), in the chat template."""
    from wandacli.evaluation.prompts import model_texts, read_prompts

    search = read_prompts("advbench", offset=100, limit=32).texts
    held_out = read_prompts("advbench", limit=HELD_OUT).texts
    search_texts, special = model_texts(loaded.tokenizer, search, "chat")
    held_texts, held_special = model_texts(loaded.tokenizer, held_out, "chat")
    return lambda: _measure(loaded, search_texts, special, held_texts, held_special)


def correlation_rows(measured: dict[str, dict[str, float]], title: str, models: str) -> list[Row]:
    """Spearman's ρ of each refusal measure (sign flipped) with each sampled ASR over the
    models measured; the last row carries every model's figures."""
    from wandacli.analysis.compare import spearman

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
                    f"{title}: Spearman of -{measure} with sampled ASR ({target})",
                    spearman(a, b),
                    REPORT_ONLY,
                    models + (f" — {table}" if measure == "score" and target == "mean" else ""),
                )
            )
    return rows
