"""The JSON summaries beside the HDF5 files, typed and versioned like them: a search's
`search.json`, an evaluation's `results.json` (eval-attack) and `utility.json`
(eval-utility). Each records `format` and `format_version`; a reader refuses a newer version
in one line (files written before versions were recorded are version 1), and every reader of
a summary reads it through here, so a field is looked up in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.core.durable import atomic_write_text
from wandacli.core.errors import StoreError

SEARCH_FORMAT = "wandacli-search"
ATTACK_RESULTS_FORMAT = "wandacli-attack-results"
UTILITY_RESULTS_FORMAT = "wandacli-utility-results"
SUMMARY_VERSION = 1

ATTACK_RESULTS = "results.json"
UTILITY_RESULTS = "utility.json"

# The objectives every trial measures, in the order a study records them.
OBJECTIVES = ("refusal", "kl")


def read_json_summary(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A summary file's object, checked to be of `fmt` and a version this wandacli reads."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(
            f"{what} {path} is unreadable ({exc}): rerun the command that wrote it"
        ) from None
    if not isinstance(data, dict):
        raise StoreError(f"{what} {path} is not a JSON object: rerun the command that wrote it")
    found = data.get("format", fmt)
    if found != fmt:
        raise StoreError(f"{path} is not a wandacli {what} (format {found!r})")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > SUMMARY_VERSION:
        raise StoreError(
            f"{what} {path} has format_version {version}; this wandacli reads version "
            f"{SUMMARY_VERSION}: upgrade wandacli"
        )
    return data


def write_json_summary(path: Path, fmt: str, data: dict[str, Any]) -> None:
    """A summary written atomically, with its format and version first."""
    payload = {"format": fmt, "format_version": SUMMARY_VERSION} | {
        k: v for k, v in data.items() if k not in ("format", "format_version")
    }
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# search.json


def is_complete(trial: dict[str, Any]) -> bool:
    """A trial that measured both objectives (not one that failed or was interrupted)."""
    return trial.get("state") == "COMPLETE"


@dataclass
class SearchSummary:
    """A search's record: its request, the dense model's measures, every trial, the Pareto
    front, the random control, what was kept (and `--select reference`'s candidates).
    `other` holds the rest it records (settings, prompts' digests, versions, times)."""

    name: str
    request: dict[str, Any] = field(default_factory=dict)
    dense: dict[str, Any] | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    front: list[dict[str, Any]] = field(default_factory=list)
    control: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    kept: list[str] = field(default_factory=list)
    selection: dict[str, Any] | None = None
    prompts: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, Any] = field(default_factory=dict)
    trials_asked: int = 0
    other: dict[str, Any] = field(default_factory=dict)

    FIELDS = (
        "name",
        "request",
        "dense",
        "trials",
        "front",
        "control",
        "best",
        "kept",
        "selection",
        "prompts",
        "objectives",
        "trials_asked",
    )

    @property
    def kind(self) -> str | None:
        return self.request.get("kind")

    @property
    def complete_trials(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if is_complete(t)]

    @property
    def dominated_trials(self) -> list[dict[str, Any]]:
        """Trials stopped after their refusal: the dense model dominates them (search
        `--skip-dominated`)."""
        return [t for t in self.trials if t.get("state") == "PRUNED"]

    def trials_counted(self) -> str:
        """'N complete trials', and how many more were dominated by the dense model."""
        dominated = len(self.dominated_trials)
        return f"{len(self.complete_trials)} complete trials" + (
            f" (and {dominated} dominated by the dense model, their KL not measured)"
            if dominated
            else ""
        )

    @property
    def amount_name(self) -> str:
        """What a trial's size is: `sparsity` (masks) or `removed_rank_fraction` (edits), as
        the dense model's entry records it."""
        dense = self.dense or {}
        return "removed_rank_fraction" if "removed_rank_fraction" in dense else "sparsity"

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        """The searched ranges by option name (the request's only [LO, HI] values)."""
        return {
            key: (float(value[0]), float(value[1]))
            for key, value in self.request.items()
            if isinstance(value, list) and len(value) == 2
        }

    @classmethod
    def read(cls, path: Path) -> SearchSummary:
        data = read_json_summary(path, SEARCH_FORMAT, "search summary")
        known = {k: data[k] for k in cls.FIELDS if data.get(k) is not None}
        known.setdefault("name", path.parent.name)
        other = {
            k: v
            for k, v in data.items()
            if k not in cls.FIELDS and k not in ("format", "format_version")
        }
        return cls(**known, other=other)

    def write(self, path: Path) -> None:
        write_json_summary(path, SEARCH_FORMAT, self.to_json())

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.FIELDS}
        return data | self.other


# ---------------------------------------------------------------------------------------------
# results.json and utility.json


@dataclass
class EvaluationSummary:
    """One model under test's results (`results.json` or `utility.json`): what was evaluated,
    and the figures."""

    model_under_test: dict[str, Any]
    data: dict[str, Any]

    @property
    def attack_results(self) -> list[dict[str, Any]]:
        """Per attack configuration: its metric, ASR and the shares beside it."""
        return list(self.data.get("results") or [])

    def figure(self, name: str) -> float | None:
        """A figure of utility.json (`perplexity`, `kl`, `zero_shot_mean`), None when not
        measured."""
        value = self.data.get(name)
        return float(value) if isinstance(value, (int, float)) else None


def read_evaluation(path: Path) -> EvaluationSummary:
    """results.json or utility.json, by its name."""
    fmt, what = (
        (ATTACK_RESULTS_FORMAT, "attack results file")
        if path.name == ATTACK_RESULTS
        else (UTILITY_RESULTS_FORMAT, "utility results file")
    )
    data = read_json_summary(path, fmt, what)
    under_test = data.get("model_under_test")
    return EvaluationSummary(under_test if isinstance(under_test, dict) else {}, data)


def write_evaluation(path: Path, data: dict[str, Any]) -> None:
    fmt = ATTACK_RESULTS_FORMAT if path.name == ATTACK_RESULTS else UTILITY_RESULTS_FORMAT
    write_json_summary(path, fmt, data)
