"""The two objectives every trial is measured on: how much the model still refuses on the
search prompts, and the KL cost from the dense model on harmless prompts (its dense side
computed once, cached beside the search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wandacli.config.ranges import BestRule
from wandacli.core.console import Reporter, info
from wandacli.evaluation.divergence import (
    DenseDistributions,
    dense_distributions,
    describe_layout,
    kl_divergence,
    recorded_streams,
)
from wandacli.evaluation.lower_layers import describe, unusable
from wandacli.evaluation.prompts import PromptSet, model_texts, template_for
from wandacli.evaluation.refusal import (
    prompt_streams,
    refusal_rate,
    refusal_score,
    score_streams,
)
from wandacli.search.config import SearchConfig


class Objectives:
    """The search prompts and the harmless prompts in the model's template, the dense
    model's distributions on the latter, and one `measure()` of the model as it is now."""

    def __init__(
        self,
        config: SearchConfig,
        loaded: Any,
        search_prompts: PromptSet,
        kl_prompts: PromptSet,
        directory: Path,
        reporter: Reporter,
        record_streams: bool = True,
    ) -> None:
        self.config = config
        self.loaded = loaded
        self.directory = directory
        self.reporter = reporter
        self.template = template_for(config.template, loaded.tokenizer)
        self.refusal_texts, self.special = model_texts(
            loaded.tokenizer, search_prompts.texts, self.template
        )
        self.kl_texts, self.kl_special = model_texts(
            loaded.tokenizer, kl_prompts.texts, self.template
        )
        self.dense_kl = self.dense(self.kl_texts, config.kl_settings.kl_positions, self.kl_special)
        info(describe_layout(self.dense_kl))
        # A trial that leaves the lower layers alone starts the KL's pass and the refusal
        # prompts' pass above them; where no trial can, nothing is recorded (one KL pass and
        # up to 2 GiB of host memory saved).
        never = unusable("every trial changes the embedding or layer 0")
        self.streams = recorded_streams(loaded, self.dense_kl) if record_streams else never
        info(describe(self.streams))
        if not record_streams:
            self.refusal_streams = never
        elif config.refusal == "generation":
            self.refusal_streams = prompt_streams(
                loaded,
                self.refusal_texts,
                add_special_tokens=self.special,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
            )
        else:
            self.refusal_streams = score_streams(
                loaded,
                self.refusal_texts,
                add_special_tokens=self.special,
                batch_size=config.batch_size,
            )
        info(describe(self.refusal_streams, "refusal prompts"))

    def dense(self, texts: list[str], positions: int, special: bool) -> DenseDistributions:
        """The dense model's next-token distributions on `texts` (cached in the search's
        folder)."""
        return dense_distributions(
            self.loaded,
            texts,
            positions=positions,
            add_special_tokens=special,
            batch_size=self.config.batch_size,
            cache_dir=self.directory,
            reporter=self.reporter,
        )

    def refusal(self, unchanged_below: int = 0) -> float:
        """The trial's refusal as `--refusal` measures it."""
        if self.config.refusal == "score":
            return refusal_score(
                self.loaded,
                self.refusal_texts,
                add_special_tokens=self.special,
                batch_size=self.config.batch_size,
                streams=self.refusal_streams,
                unchanged_below=unchanged_below,
            )
        return self.refusal_rate(unchanged_below)

    def refusal_rate(self, unchanged_below: int = 0) -> float:
        """The share of greedy responses the keyword rule calls refusals (`--refusal
        generation`'s measure, and the count of a scored front's points)."""
        rate, _ = refusal_rate(
            self.loaded,
            self.refusal_texts,
            add_special_tokens=self.special,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            stop_at_phrase=True,  # only the rate is kept
            # A scored search's streams carry no keys and values: its counts run whole.
            streams=self.refusal_streams if self.config.refusal == "generation" else None,
            unchanged_below=unchanged_below,
        )
        return rate

    def measure(
        self, unchanged_below: int = 0, dominated_from: float | None = None
    ) -> dict[str, float]:
        """Both objectives of the model as it is now; `unchanged_below`: its embedding and
        layers below that index are the dense model's (`WeightChanges.unchanged_below`).
        Where the refusal is `dominated_from` or more, the trial is dominated by the dense
        model whatever its KL: only the refusal is measured."""
        refusal = self.refusal(unchanged_below)
        if dominated_from is not None and refusal >= dominated_from:
            return {"refusal": refusal}
        kl = kl_divergence(
            self.loaded, self.dense_kl, streams=self.streams, unchanged_below=unchanged_below
        )
        return {"refusal": refusal, "kl": kl}


DOMINATED_RULE = (
    "a trial refusing as much as the dense model or more is dominated by it (the dense model's "
    "KL is 0): its KL is not measured and the sampler is told it was pruned"
)


def dominated_from(config: SearchConfig, dense: dict[str, Any] | None) -> float | None:
    """The refusal from which a trial is dominated by the dense model whatever its KL (the
    dense model's own: its KL is 0), so its KL need not be measured; None where every trial's
    KL is measured (`--measure-dominated`; `--objective keep-best`, whose sampler is told the
    KL of every trial or the refusal within a KL limit)."""
    if not skips_dominated(config) or dense is None:
        return None
    return float(dense["refusal"])


def skips_dominated(config: SearchConfig) -> bool:
    return not config.measure_dominated and config.objective != "keep-best"


# heretic 1.4.0's objective (../REFERENCE: "Objectives"): refusals ÷ the original's refusals and
# KL ÷ 1.0; below a KL of 0.01 the KL term is the refusal term × 0.01.
HERETIC_KL_FLOOR = 0.01
HERETIC_KL_SCALE = 1.0
HERETIC_RULE = (
    "TPE told (refusal ÷ the dense model's refusal, KL ÷ 1.0), the KL term replaced by "
    "0.01 × the refusal term where KL < 0.01 (heretic 1.4.0's objective)"
)


def sampler_rule(objective: str, rule: BestRule | None) -> str | None:
    """What the sampler is told, in words, where it is not the measured refusal and KL."""
    if objective == "heretic":
        return HERETIC_RULE
    if objective == "keep-best" and rule is not None:
        return (
            f"the sampler told the {rule.other} alone, with {rule.objective} ≤ {rule.limit:g} "
            "(the --keep-best rule) each trial's constraint: Optuna's constrained sampling, "
            "the trials within the limit modelled first and the rest by how far they exceed it"
        )
    return None


def sampler_values(
    measured: dict[str, float],
    objective: str,
    dense: dict[str, Any] | None,
    rule: BestRule | None = None,
) -> list[float]:
    """What TPE is told of a trial: the measured refusal and KL in OBJECTIVES' order
    (`wandacli`), heretic's terms of them (`heretic`), or the rule's other objective alone
    (`keep-best`: its limit is a constraint, `limit_excess`)."""
    refusal, kl = measured["refusal"], measured["kl"]
    if objective == "keep-best":
        if rule is None:
            raise ValueError("the keep-best objective needs the --keep-best rule")
        return [measured[rule.other]]
    if objective != "heretic":
        return [refusal, kl]
    original = float((dense or {}).get("refusal") or 0.0)
    ratio = refusal / original if original > 0 else refusal
    kl_term = kl / HERETIC_KL_SCALE if kl >= HERETIC_KL_FLOOR else HERETIC_KL_FLOOR * ratio
    return [ratio, kl_term]


def limit_excess(measured: dict[str, float], rule: BestRule) -> float:
    """`keep-best`'s constraint on a trial: how far its measured value exceeds the rule's
    limit (≤ 0: within it; Optuna's constrained TPE models those trials first)."""
    return measured[rule.objective] - rule.limit
