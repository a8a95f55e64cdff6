"""How two judges agree on the same responses: the share of equal verdicts, Cohen's kappa
(agreement beyond what their two rates give by chance), and the responses they disagree on
most (by the gap between their scores where both grade, else in order). Read from the JSONL
rows `eval-attack --rejudge` leaves with every judge's verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

DISAGREEMENTS_SHOWN = 3


def cohen_kappa(a: list[int], b: list[int]) -> float | None:
    """Cohen's kappa of two binary verdict lists; None when chance agreement is total (both
    judges gave one verdict throughout)."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return None if chance == 1 else (observed - chance) / (1 - chance)


@dataclass
class Disagreement:
    run: str
    question_id: int
    sample: int
    verdicts: tuple[int, int]
    scores: tuple[float | None, float | None]
    excerpt: str

    @property
    def gap(self) -> float:
        a, b = self.scores
        return abs(a - b) if a is not None and b is not None else 1.0

    @property
    def scores_text(self) -> str:
        if all(s is None for s in self.scores):
            return ""
        return "(scores " + " / ".join("-" if s is None else f"{s:.2f}" for s in self.scores) + ")"


@dataclass
class JudgeAgreement:
    label: str  # the results folder (one model under test)
    judges: tuple[str, str]
    responses: int
    agreement: float
    kappa: float | None
    rates: tuple[float, float]  # each judge's share of successes, over responses
    disagreements: list[Disagreement]


def _rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        try:
            rows += [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]
        except (OSError, ValueError):
            continue
    return rows


def folder_agreements(folder: Path) -> list[JudgeAgreement]:
    """Every pair of judges that judged all of a results folder's responses."""
    rows = _rows(folder)
    names = sorted({name for row in rows for name in row.get("judges") or {}})
    found = []
    for first, second in combinations(names, 2):
        pairs = [
            (row, row["judges"][first], row["judges"][second])
            for row in rows
            if first in (row.get("judges") or {}) and second in row["judges"]
        ]
        if not pairs or len(pairs) < len(rows):
            continue
        a = [int(x["success"]) for _, x, _ in pairs]
        b = [int(y["success"]) for _, _, y in pairs]
        differing = [
            Disagreement(
                str(row.get("config")),
                int(row.get("question_id", 0)),
                int(row.get("sample", 0)),
                (int(x["success"]), int(y["success"])),
                (x.get("score"), y.get("score")),
                str(row.get("response", ""))[:100],
            )
            for row, x, y in pairs
            if int(x["success"]) != int(y["success"])
        ]
        differing.sort(key=lambda d: -d.gap)
        found.append(
            JudgeAgreement(
                folder.name,
                (first, second),
                len(pairs),
                sum(x == y for x, y in zip(a, b, strict=True)) / len(pairs),
                cohen_kappa(a, b),
                (sum(a) / len(a), sum(b) / len(b)),
                differing[:DISAGREEMENTS_SHOWN],
            )
        )
    return found


def judge_agreements(results_dir: Path) -> list[JudgeAgreement]:
    """Every results folder's judge pairs, folder by folder."""
    if not results_dir.is_dir():
        return []
    return [
        a
        for folder in sorted(results_dir.iterdir())
        if folder.is_dir()
        for a in folder_agreements(folder)
    ]
