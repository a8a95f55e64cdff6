"""Judges of a response, one module each, registered under the names core/judges.py declares:
the reference's keyword rule, HarmBench's classifiers, Llama Guard 3, StrongREJECT and WildGuard.
A judge's model runs through the one loader on eval-attack's device and dtype; its prompt is its
published format byte for byte (tests/data/judges/ pins each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wandacli.config.evaluation import AttackConfig
from wandacli.core import reference
from wandacli.core.console import warn
from wandacli.core.judges import parse_judge
from wandacli.evaluation.judges import harmbench, keyword, llamaguard, strongreject, wildguard
from wandacli.evaluation.judges.base import Judge, Verdict
from wandacli.evaluation.judges.classifier import JudgeContext
from wandacli.evaluation.judges.keyword import KeywordJudge
from wandacli.evaluation.keyword_rule import KEYWORD_JUDGE_MIN_TOKENS

__all__ = ["JUDGES", "Judge", "JudgeContext", "KeywordJudge", "Verdict", "make_judge"]

# name (core/judges.py) → the judge's maker: (its model, or None for the keyword rule; context)
JUDGES: dict[str, Callable[[str | None, Any], Judge]] = {
    "keyword": keyword.make,
    "harmbench": harmbench.make,
    "harmbench-val": harmbench.make_validation,
    "llamaguard": llamaguard.make,
    "llamaguard-1b": llamaguard.make_small,
    "strongreject": strongreject.make,
    "strongreject-rubric": strongreject.make_rubric,
    "wildguard": wildguard.make,
}


def check_response_budget(config: AttackConfig) -> None:
    """Say so, before generating, when --max-new-tokens is too short for the keyword judge: a
    cut response is judged on its opening alone, before it could refuse later in it or show
    that it carries the attack out."""
    if config.judge == "keyword" and config.max_new_tokens < KEYWORD_JUDGE_MIN_TOKENS:
        warn(
            f"--max-new-tokens {config.max_new_tokens} is short for the keyword judge: a "
            f"response cut at {config.max_new_tokens} tokens is judged on its opening alone "
            "(no refusal phrase in it = an attack), where a longer one might refuse later or "
            f"stop short of {reference.MIN_WORDS_FOR_SUCCESS} words; use --max-new-tokens "
            f"{KEYWORD_JUDGE_MIN_TOKENS} or more (the reference's: {reference.MAX_NEW_TOKENS})"
        )


def judge_label(spec: str) -> str:
    """The name results record for `--judge spec`: NAME, or NAME:MODEL where a model was
    chosen (`hf:MODEL` is recorded as `harmbench:MODEL`)."""
    name, model = parse_judge(spec)
    return f"{name}:{model}" if ":" in spec else name


def make_judge(spec: str, context: JudgeContext) -> Judge:
    """The judge `--judge spec` names (NAME or NAME:MODEL), its model loaded."""
    name, model = parse_judge(spec)
    judge = JUDGES[name](model, context)
    judge.name = judge_label(spec)
    return judge


def judge_of(config: AttackConfig) -> Judge:
    """eval-attack's judge: --judge, its model on the model under test's device and dtype."""
    return make_judge(config.judge, context_of(config, config.max_new_tokens))


def context_of(config: AttackConfig, max_new_tokens: int) -> JudgeContext:
    """Where eval-attack's judge runs: the model under test's device and dtype, its backend
    and vLLM's options; `max_new_tokens`: the budget the responses were generated with."""
    return JudgeContext(
        config.model,
        config.batch_size,
        max_new_tokens,
        backend=config.backend,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
    )
