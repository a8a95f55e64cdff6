"""`compare --plot FILE`: the figure of whichever comparison `compare` computed, drawn with
the heatmaps of reporting/figures.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wandacli.analysis.compare import Comparison
from wandacli.analysis.directions import DirectionCosines
from wandacli.analysis.subspaces import SubspaceComparison
from wandacli.core.paths import plot_format
from wandacli.reporting.figures import direction_cosines_heatmap, jaccard_heatmap, subspace_heatmap


def stem_of(path: Path) -> Path:
    return path.parent / path.name[: -len(path.suffix)]


def comparison_heatmap(result: Comparison, path: Path) -> None:
    """`compare --plot FILE`: the first pair's Jaccard index per (layer, module)."""
    pair = result.pairs[0]
    jaccard = {}
    for figures in pair.modules:
        layer, module = figures.key.split("/", 1)
        jaccard[(int(layer), module)] = figures.overlap.jaccard
    jaccard_heatmap(jaccard, pair.a, pair.b, stem_of(path), formats=(plot_format(path),))


def subspaces_heatmap(result: SubspaceComparison, path: Path) -> None:
    """`compare --plot FILE` of two rank-statistics sets: φ at the first ranks."""
    first = result.ranks[0]
    subspace_heatmap(
        result.grid(first), result.a, result.b, first, stem_of(path), (plot_format(path),)
    )


def draw_comparison(result: Any, path: Path) -> None:
    """`compare --plot FILE`, for whichever comparison `compare` computed."""
    if isinstance(result, Comparison):
        comparison_heatmap(result, path)
    elif isinstance(result, SubspaceComparison):
        subspaces_heatmap(result, path)
    elif isinstance(result, DirectionCosines):
        direction_cosines_heatmap(
            result.cosines, result.harmful, result.harmless, result.position, stem_of(path),
            (plot_format(path),),
        )  # fmt: skip
