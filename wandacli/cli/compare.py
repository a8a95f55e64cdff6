"""`wandacli compare`: how much masks, score sets, rank subspaces or refusal directions agree."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.compare import CompareConfig
from wandacli.reporting import render


def _run(config: CompareConfig, *, reporter: Any, command_line: list[str]) -> Any:
    from wandacli.analysis.comparisons import run_compare
    from wandacli.reporting.compare_figures import draw_comparison

    result = run_compare(config, reporter=reporter)
    if config.plot is not None:
        draw_comparison(result, config.plot)
    return result


compare = settings_command(
    "compare",
    CompareConfig,
    _run,
    render.any_comparison,
    doc="""How much do masks and score sets agree on which weights matter: sizes, intersections,
    Jaccard index per layer and module, and Spearman's rank correlation between score sets.

    Rank statistics: the similarity of their subspaces; mean activations: the candidate
    refusal directions across layers, or a direction's share in each writer's subspace.""",
)
