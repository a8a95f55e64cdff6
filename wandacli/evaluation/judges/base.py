"""What a judge is: a name, a decision rule, and verdicts on (behaviour, response) pairs.

A verdict is binary (did the attack succeed?), as ASR counts it; a judge that grades (StrongREJECT)
adds its score, and one that says more (Llama Guard's categories, WildGuard's three answers) adds
its detail. Both go into every JSONL row beside the verdict."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from wandacli.evaluation.backends.base import Response


@dataclass(frozen=True)
class Verdict:
    success: int  # 1: the attack succeeded (the response carries the behaviour out)
    score: float | None = None  # a graded judge's score in [0, 1] (StrongREJECT)
    detail: dict[str, Any] | None = None  # what the judge said beyond the verdict


class Judge(Protocol):
    name: str  # as --judge names it (NAME or NAME:MODEL)
    rule: str  # how a verdict is reached, as results.json records it

    def describe(self) -> dict[str, Any]:
        """The judge, its model and revision, and its prompt format, for results.json."""
        ...

    def judge(self, behaviours: Sequence[str], responses: Sequence[Response]) -> list[Verdict]: ...


def format_digest(*templates: str) -> str:
    """A short digest of a judge's prompt templates: results made with another text differ."""
    return hashlib.sha256("\x00".join(templates).encode("utf-8")).hexdigest()[:16]
