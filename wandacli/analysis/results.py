"""The rows of the results table, read from a results directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.core.errors import StoreError
from wandacli.store.summaries import (
    ATTACK_RESULTS,
    UTILITY_RESULTS,
    EvaluationSummary,
    read_evaluation,
)

MOSTLY_DEGENERATE = 0.5  # a row's ASR is marked when this share of its successes is gibberish


@dataclass
class ResultRow:
    label: str
    method: str = "-"
    model: str | None = None  # the model evaluated (a mask's rows share the model it was made for)
    actual_sparsity: float | None = None
    asr: dict[str, float] = field(default_factory=dict)  # metric name -> ASR
    # metric name -> the share of its successful responses that are degenerate
    degenerate: dict[str, float] = field(default_factory=dict)
    # metric name -> the share of its successful responses that are word salad
    word_salad: dict[str, float] = field(default_factory=dict)
    # metric name -> a graded judge's mean score (StrongREJECT)
    mean_score: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    kl: float | None = None  # eval-utility --kl: KL from the dense model on harmless prompts
    zero_shot_mean: float | None = None
    p_q: tuple[float, float] | None = None  # a set difference's (p, q)
    removed_rank_fraction: float | None = None  # a rank edit's share of the model's rank
    matches: str | None = None  # a --match-counts control: the mask it matches
    prompts: str | None = None  # the attack prompts' source (results.json)
    search: dict[str, Any] | None = None  # kept by `search`: its name, trial and prompts
    finetune: dict[str, Any] | None = None  # saved by `finetune`: its mode, mask and step

    @property
    def is_control(self) -> bool:
        return self.matches is not None

    def mostly_degenerate(self, metric: str) -> bool:
        """Whether at least half of the metric's successes are degenerate responses (repetition,
        or word salad): its ASR counts gibberish, not answers."""
        share = max(self.degenerate.get(metric, 0.0), self.word_salad.get(metric, 0.0))
        return share >= MOSTLY_DEGENERATE

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "model": self.model,
            "actual_sparsity": self.actual_sparsity,
            "p_q": self.p_q,
            "matches": self.matches,
            "prompts": self.prompts,
            "search": self.search,
            "finetune": self.finetune,
            "removed_rank_fraction": self.removed_rank_fraction,
            "asr": self.asr,
            "degenerate": self.degenerate,
            "word_salad": self.word_salad,
            "mean_score": self.mean_score,
            "perplexity": self.perplexity,
            "kl": self.kl,
            "zero_shot_mean": self.zero_shot_mean,
        }


def _fill(row: ResultRow, summary: EvaluationSummary) -> None:
    """What one results.json or utility.json says of its model under test."""
    under_test = summary.model_under_test
    row.method = str(under_test.get("method", row.method))
    row.model = str(under_test["model"]) if under_test.get("model") else row.model
    row.actual_sparsity = under_test.get("actual_sparsity", row.actual_sparsity)
    if under_test.get("p_q"):
        p, q = under_test["p_q"]
        row.p_q = (float(p), float(q))
    row.matches = under_test.get("matches") or row.matches
    row.prompts = under_test.get("prompts") or row.prompts
    row.search = under_test.get("search") or row.search
    row.finetune = under_test.get("finetune") or row.finetune
    if under_test.get("removed_rank_fraction") is not None:
        row.removed_rank_fraction = float(under_test["removed_rank_fraction"])
    for result in summary.attack_results:
        row.asr[str(result["metric"])] = float(result["asr"])
        if result.get("degenerate_share") is not None:
            row.degenerate[str(result["metric"])] = float(result["degenerate_share"])
        if result.get("word_salad_share") is not None:
            row.word_salad[str(result["metric"])] = float(result["word_salad_share"])
        if result.get("mean_score") is not None:
            row.mean_score[str(result["metric"])] = float(result["mean_score"])
        if result.get("sample_mean") is not None:  # the reference's figure, beside
            row.asr[f"{result['metric']}_sample_mean"] = float(result["sample_mean"])
    for name in ("perplexity", "kl", "zero_shot_mean"):
        value = summary.figure(name)
        if value is not None:
            setattr(row, name, value)


def collect(results_dir: Path) -> list[ResultRow]:
    """One row per subdirectory holding results.json and/or utility.json; dense first."""
    if not results_dir.is_dir():
        raise StoreError(
            f"results directory {results_dir} does not exist: run eval-attack or eval-utility with --out inside it"
        )
    rows = []
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        row = ResultRow(folder.name)
        found = False
        for name in (ATTACK_RESULTS, UTILITY_RESULTS):
            if (folder / name).is_file():
                _fill(row, read_evaluation(folder / name))
                found = True
        if found:
            rows.append(row)
    if not rows:
        raise StoreError(
            f"no results in {results_dir}: expected subdirectories with results.json or utility.json"
        )
    rows.sort(key=lambda r: (r.method != "dense", r.label))
    return rows
