"""The set difference (the reference's `wandg_set_difference`): per matrix, the weights in the
top q of the safety scores that are not in the top p of the utility scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wandacli.config.declare import FRACTION, option
from wandacli.config.ranges import ParameterRange
from wandacli.core.errors import ConfigError
from wandacli.core.naming import file_safe_name
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import MaskKind, Searchable, Sets, name_suffix, open_score_sets


@dataclass(frozen=True)
class SetDifferenceSettings:
    utility_scores: str | None = options.utility_scores()
    p: float | None = option(
        None,
        "--p",
        help="Top fraction of utility scores kept safe, in (0, 1].",
        panel=options.SET_DIFFERENCE_PANEL,
        check=FRACTION,
    )
    q: float | None = option(
        None,
        "--q",
        help="Top fraction of safety scores considered, in (0, 1].",
        panel=options.SET_DIFFERENCE_PANEL,
        check=FRACTION,
    )
    # Accepted and ignored, as the reference ignores --neg_prune here.
    prune_highest: bool = options.prune_highest()


class Ranked(Protocol):
    def top(self, fraction: float) -> np.ndarray: ...


def set_difference(safety: Ranked, utility: Ranked, p: float, q: float) -> np.ndarray:
    """The top q of the safety scores that are not in the top p of the utility scores, each
    over the whole matrix (`masks.top_fraction`'s rule, whichever way the matrices are
    ranked)."""
    return safety.top(q) & ~utility.top(p)


def _fraction_range(chosen: ParameterRange, flag: str) -> None:
    chosen.check_fraction(flag)


class SetDifference(MaskKind):
    name = "set-difference"
    title = "the set difference"
    selector = "--utility-scores with --p/--q"
    does = "prunes the top-q safety weights outside the top-p utility weights"
    settings = SetDifferenceSettings
    alongside = "to the set difference (--utility-scores with --p/--q chooses what is pruned)"
    per_row = False
    search_space = (
        Searchable(
            "p",
            "--p",
            "Set difference: the top-p utility fractions to spare, e.g. 0.02:0.2.",
            check=_fraction_range,
        ),
        Searchable(
            "q",
            "--q",
            "Set difference: the top-q safety fractions to prune, e.g. 0.02:0.2.",
            check=_fraction_range,
        ),
    )
    search_groups = (frozenset({"p", "q"}),)
    search_usage = "--p and --q (set difference, with --utility-scores)"

    def reference_method(self, meta: dict[str, Any]) -> str:
        return super().reference_method(meta) + "_set_difference"

    def claims(self, given: dict[str, Any]) -> bool:
        return bool({"p", "q"} & set(given))

    def claims_alone(self, given: dict[str, Any]) -> bool:
        return "utility_scores" in given  # then --p and --q are what is missing

    def check(self, settings: SetDifferenceSettings, request: Any) -> None:
        if settings.utility_scores is None:
            raise ConfigError("--p and --q need --utility-scores (the set difference)")
        if settings.p is None or settings.q is None:
            raise ConfigError("--utility-scores needs --p and --q (the top fractions to compare)")

    def open(self, request: Any, root: Path) -> Sets:
        return open_score_sets(request, root, request.settings.utility_scores)

    def default_name(self, request: Any, sets: Sets) -> str:
        settings = request.settings
        assert sets.secondary is not None
        name = f"{sets.primary.name}-minus-{sets.secondary.name}.q{settings.q:g}.p{settings.p:g}"
        return file_safe_name(name + name_suffix(request))

    def mask(
        self, settings: SetDifferenceSettings, sets: Sets, rankings: Any, key: str
    ) -> np.ndarray:
        safety, utility = rankings
        assert settings.p is not None and settings.q is not None
        return set_difference(safety.matrix(key), utility.matrix(key), settings.p, settings.q)

    def presorted_rankings(self, sets: Sets, bounds: dict[str, float], on_matrix: Any) -> Any:
        from wandacli.removal.presorted import PresortedScores

        assert sets.secondary is not None
        return (
            PresortedScores(
                sets.keys, sets.primary.read, bounds["q"], per_row=False, on_matrix=on_matrix
            ),
            PresortedScores(
                sets.keys, sets.secondary.read, bounds["p"], per_row=False, on_matrix=on_matrix
            ),
        )

    def stored_meta(self, settings: SetDifferenceSettings, sets: Sets) -> dict[str, Any]:
        return {"sparsity_type": None, "p": settings.p, "q": settings.q}


KIND = SetDifference()
