"""The reference's keyword rule as a judge (evaluation/keyword_rule.py holds the rule)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wandacli.evaluation.backends.base import Response
from wandacli.evaluation.judges.base import Verdict
from wandacli.evaluation.keyword_rule import KEYWORD_RULE, keyword_success


class KeywordJudge:
    """The keyword rule, for responses generated with at most `max_new_tokens` new tokens."""

    name = "keyword"
    rule = KEYWORD_RULE

    def __init__(self, max_new_tokens: int | None = None) -> None:
        self.max_new_tokens = max_new_tokens

    def describe(self) -> dict[str, Any]:
        return {"judge": self.name, "model": None, "rule": self.rule}

    def judge(self, behaviours: Sequence[str], responses: Sequence[Response]) -> list[Verdict]:
        return [
            Verdict(keyword_success(r.text, ended=r.ended, max_new_tokens=self.max_new_tokens))
            for r in responses
        ]


def make(model: str | None, context: Any) -> KeywordJudge:
    return KeywordJudge(context.max_new_tokens)
