"""`wandacli report`: the study's table and figures from a results directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wandacli.cli.options import (
    ConfigOption,
    JsonOption,
)
from wandacli.core.errors import ConfigError
from wandacli.reporting import render


def report(
    results: Annotated[
        Path, typer.Argument(help="Results directory: one subdirectory per model under test.")
    ] = Path("wandacli-results"),
    markdown_file: Annotated[
        Path | None,
        typer.Option(
            "--markdown",
            help="Also write the table, and the figures of --plots embedded, as a Markdown document.",
        ),
    ] = None,
    plots: Annotated[
        Path | None,
        typer.Option(
            "--plots",
            help="Draw the study's figures into this folder, as PNG and SVG: ASR against "
            "perplexity, ASR and perplexity against sparsity, and the Jaccard heatmaps of --compare.",
        ),
    ] = None,
    compare_dir: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="Folder of `wandacli compare --csv` files: one Jaccard heatmap per pair (with --plots).",
        ),
    ] = None,
    searches: Annotated[
        Path | None,
        typer.Option(
            "--searches",
            metavar="STORE",
            help="Also report the store's searches: each front as a table (in --markdown) and "
            "a figure (with --plots).",
        ),
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """One table of every model under test: sparsity, attack success rates, perplexity; with
    --plots, the study's figures."""
    from wandacli.reporting.report import build_report

    if compare_dir is not None and plots is None:
        raise ConfigError("--compare draws heatmaps: give --plots DIR too")
    result = build_report(
        results,
        markdown_file=markdown_file,
        plots_dir=plots,
        compare_dir=compare_dir,
        searches_store=searches,
    )
    render.report(result, as_json=json_output)
