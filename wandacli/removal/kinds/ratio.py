"""A share of every row (or matrix) of one score set: the reference's Wanda pruning (the lowest
scores) and the top of a score set (`--prune-highest`, the weights attribution ranks highest);
the reference's `--use_variant` too. Searched as `top`: each row's top fraction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from wandacli.config.declare import option
from wandacli.core.errors import ConfigError
from wandacli.core.naming import file_safe_name
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import MaskKind, Searchable, Sets, name_suffix, open_score_sets
from wandacli.removal.masks import matrix_mask, row_mask, variant_mask


@dataclass(frozen=True)
class RatioSettings:
    sparsity_ratio: float | None = options.sparsity_ratio()
    prune_highest: bool = options.prune_highest()
    variant: bool = option(
        False,
        "--variant",
        help="The Wanda variant: per-row cumulative-score threshold (the reference's --use_variant).",
    )
    scope: Literal["row", "matrix"] = option(
        "row",
        "--scope",
        help="row: each row prunes its share (the reference); matrix: rank a whole matrix at once.",
    )


def _check_top_ratio(chosen: Any, flag: str) -> None:
    chosen.check_fraction(flag)


class Ratio(MaskKind):
    name = "ratio"
    title = "ratio pruning"
    selector = "--sparsity-ratio"
    alongside = "to ratio pruning (--sparsity-ratio)"
    does = "prunes a share of each row"
    settings = RatioSettings
    modes = ("row", "matrix", "variant")
    per_row = True
    searched_as = "top"
    search_fixed: ClassVar[dict[str, Any]] = {"prune_highest": True}
    search_space = (
        Searchable(
            "sparsity_ratio",
            "--ratio",
            "Top of --scores alone: each row's top fraction pruned, e.g. 0.001:0.05.",
            check=_check_top_ratio,
        ),
    )
    search_groups = (frozenset({"sparsity_ratio"}),)
    search_usage = "--ratio (the top of --scores)"

    def claims(self, given: dict[str, Any]) -> bool:
        return bool({"sparsity_ratio", "variant", "scope"} & set(given))

    def check(self, settings: RatioSettings, request: Any) -> None:
        if settings.sparsity_ratio is None:
            raise ConfigError(
                "--sparsity-ratio is required (e.g. 0.5), or use --sparsity-type N:M or --utility-scores"
            )
        if settings.variant and settings.scope != "row":
            raise ConfigError("--variant ranks rows: it cannot be combined with --scope matrix")

    def mode(self, settings: RatioSettings) -> str:
        if settings.variant:
            return "variant"
        return "matrix" if settings.scope == "matrix" else "row"

    def effective_ratio(self, settings: RatioSettings) -> float | None:
        return settings.sparsity_ratio

    def open(self, request: Any, root: Path) -> Sets:
        return open_score_sets(request, root, None)

    def default_name(self, request: Any, sets: Sets) -> str:
        settings = request.settings
        tag = {"variant": "v", "matrix": "m"}.get(self.mode(settings), "r")
        name = f"{sets.primary.name}.{tag}{settings.sparsity_ratio:g}"
        if settings.prune_highest:
            name += ".top"
        return file_safe_name(name + name_suffix(request))

    def mask(self, settings: RatioSettings, sets: Sets, rankings: Any, key: str) -> np.ndarray:
        ratio, highest = settings.sparsity_ratio, settings.prune_highest
        assert ratio is not None
        if settings.variant:
            return variant_mask(sets.primary.read(key), ratio, prune_highest=highest)
        if settings.scope == "matrix":
            return matrix_mask(sets.primary.read(key), ratio, prune_highest=highest)
        if highest:  # the top of each row: selected as a search's trial selects it
            return rankings[0].matrix(key).top(ratio)
        return row_mask(sets.primary.read(key), ratio)

    def presorted_rankings(self, sets: Sets, bounds: dict[str, float], on_matrix: Any) -> Any:
        from wandacli.removal.presorted import PresortedScores

        ranked = PresortedScores(
            sets.keys,
            sets.primary.read,
            bounds["sparsity_ratio"],
            per_row=True,
            on_matrix=on_matrix,
        )
        return ranked, None

    def stored_meta(self, settings: RatioSettings, sets: Sets) -> dict[str, Any]:
        return {
            "sparsity_ratio": settings.sparsity_ratio,
            "prune_highest": settings.prune_highest,
            "variant": settings.variant,
            "scope": settings.scope,
        }


KIND = Ratio()
