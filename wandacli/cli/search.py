"""`wandacli search`: the operating point of a removal, found from the stored sets."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.declare import declared_fields
from wandacli.reporting import render
from wandacli.search.config import SearchConfig, range_options, search_config


def _run(config: SearchConfig, *, reporter: Any, command_line: list[str]) -> Any:
    from wandacli.reporting.figures import search_front
    from wandacli.search.run import FIGURE_STEM, run_search

    result = run_search(config, reporter=reporter, command_line=command_line)
    figure = search_front(result.summary, result.directory / FIGURE_STEM)
    result.figure = figure.stem if figure is not None else None
    return result


search = settings_command(
    "search",
    SearchConfig,
    _run,
    render.search_result,
    options=[*declared_fields(SearchConfig), *range_options()],
    make=search_config,
    doc="""Search a removal's parameters from the stored sets: refusal against KL, the Pareto
    front kept as masks or edits.

    Optuna's multi-objective TPE over one kind's parameters: the set difference's p and q,
    the top ratio of a score set, the orthogonal projection's ranks, or the refusal
    direction's layer, position and share. Every trial builds the removal in memory from the
    store, measures how much the model still refuses on the search prompts and the KL
    divergence from the dense model on harmless prompts, and restores the weights. Rerun to
    resume.""",
)
