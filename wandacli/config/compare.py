"""The settings of `wandacli compare`: which stored files, and how they are set side by side."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path

from wandacli.config.declare import FRACTION, at_least, check_options, nested, option
from wandacli.config.settings import ModelSpec

RANKS_PANEL = "Rank statistics"
DIRECTIONS_PANEL = "Refusal directions"


@dataclass(frozen=True)
class CompareConfig:
    """Two or more masks or score sets (Jaccard, Spearman), two rank-statistics sets (φ of
    their subspaces), two mean-activations sets (the candidate directions' cosines), or a
    direction edit and a rank-statistics set (r's share in each writer's subspace)."""

    inputs: list[str] = option(
        MISSING,
        "inputs",
        metavar="INPUTS...",
        help="Two or more masks or score sets, two rank-statistics or mean-activations sets, "
        "or a direction edit and a rank-statistics set: paths to .h5 files (or names, with "
        "--store).",
        argument=True,
    )
    top: float = option(
        0.01,
        "--top",
        help="A score set takes part as its top fraction per matrix, in (0, 1].",
        check=FRACTION,
    )
    per_row: bool = option(
        False, "--per-row", help="Rank score sets row by row instead of per matrix."
    )
    sample: int = option(
        100_000,
        "--sample",
        help="Spearman on this many seeded random entries of larger matrices (exact below).",
        check=at_least(2),
    )
    seed: int = option(0, "--seed", help="Which entries Spearman's sample takes.")
    store: Path | None = option(
        None, "--store", "-s", help="Store to look names up in.", panel="Store"
    )
    csv_file: Path | None = option(None, "--csv", help="Write every figure to this CSV file.")
    json_file: Path | None = option(
        None, "--json-file", help="Write every figure to this JSON file."
    )
    plot: Path | None = option(
        None,
        "--plot",
        help="Draw the first pair's Jaccard heatmap (rank statistics: the φ heatmap at the "
        "first ranks; mean activations: the cosines across layers) to this file (.png or .svg).",
    )
    ranks: str = option(
        "10",
        "--ranks",
        metavar="<r,r,...>",
        help="Rank statistics (actsvd): the subspace similarity φ(r, r) at these ranks.",
        panel=RANKS_PANEL,
    )
    rank_grid: bool = option(
        False,
        "--rank-grid",
        help="Rank statistics: φ(r_a, r_b) for every pair of --ranks, not only r_a = r_b.",
        panel=RANKS_PANEL,
    )
    model: ModelSpec | None = nested(
        ModelSpec,
        optional_by="model",
        overrides={
            "model": {
                "default": None,
                "help": "Rank statistics: the model they were computed on (its weights give "
                "the output directions).",
                "panel": RANKS_PANEL,
            }
        },
    )
    position: int = option(
        -1,
        "--position",
        help="Mean-activations sets: the prompt position (from the end) whose candidate "
        "directions are compared across layers.",
        panel=DIRECTIONS_PANEL,
    )

    def __post_init__(self) -> None:
        check_options(self)
