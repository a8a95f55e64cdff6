"""`wandacli compare`: how much masks, score sets or rank subspaces agree."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wandacli.cli.options import (
    ConfigOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    NoProgressOption,
    SeedOption,
    model_spec,
)
from wandacli.core.console import progress_reporter
from wandacli.reporting import render


def compare(
    ctx: typer.Context,
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Two or more masks or score sets: paths to .h5 files (or names, with --store)."
        ),
    ],
    top: Annotated[
        float,
        typer.Option(
            "--top", help="A score set takes part as its top fraction per matrix, in (0, 1]."
        ),
    ] = 0.01,
    per_row: Annotated[
        bool, typer.Option("--per-row", help="Rank score sets row by row instead of per matrix.")
    ] = False,
    sample: Annotated[
        int,
        typer.Option(
            "--sample",
            help="Spearman on this many seeded random entries of larger matrices (exact below).",
        ),
    ] = 100_000,
    seed: SeedOption = 0,
    store: Annotated[
        Path | None,
        typer.Option("--store", "-s", help="Store to look names up in.", rich_help_panel="Store"),
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Write every figure to this CSV file.")
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json-file", help="Write every figure to this JSON file.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Draw the first pair's Jaccard heatmap (rank statistics: the φ heatmap at the "
            "first ranks) to this file (.png or .svg).",
        ),
    ] = None,
    ranks: Annotated[
        str,
        typer.Option(
            "--ranks",
            metavar="<r,r,...>",
            help="Rank statistics (actsvd): the subspace similarity φ(r, r) at these ranks.",
            rich_help_panel="Rank statistics",
        ),
    ] = "10",
    rank_grid: Annotated[
        bool,
        typer.Option(
            "--rank-grid",
            help="Rank statistics: φ(r_a, r_b) for every pair of --ranks, not only r_a = r_b.",
            rich_help_panel="Rank statistics",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Rank statistics: the model they were computed on (its weights give the "
            "output directions).",
            rich_help_panel="Rank statistics",
        ),
    ] = None,
    position: Annotated[
        int,
        typer.Option(
            "--position",
            help="Mean-activations sets: the prompt position (from the end) whose candidate "
            "directions are compared across layers.",
            rich_help_panel="Refusal directions",
        ),
    ] = -1,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """How much do masks and score sets agree on which weights matter: sizes, intersections,
    Jaccard index per layer and module, and Spearman's rank correlation between score sets."""
    from wandacli.reporting.compare import compare_files
    from wandacli.reporting.directions import comparison_kind
    from wandacli.reporting.labels import plot_format
    from wandacli.reporting.subspaces import are_rank_statistics

    if plot is not None:
        plot_format(plot)  # a bad file name fails before the comparison is computed
    direction_kind = comparison_kind(inputs, store)
    if direction_kind is not None:
        _compare_directions(ctx, direction_kind, inputs, store, position, ranks, model,
                            csv_file, json_file, plot, json_output)  # fmt: skip
        return
    if are_rank_statistics(inputs, store):
        from wandacli.reporting.subspaces import compare_rank_statistics

        with progress_reporter(enabled=not no_progress) as reporter:
            subspaces = compare_rank_statistics(
                inputs,
                store_root=store,
                model=model_spec(ctx.params) if model else None,
                ranks=ranks,
                grid=rank_grid,
                csv_file=csv_file,
                json_file=json_file,
                plot=plot,
                reporter=reporter,
            )
        render.subspace_comparison(subspaces, as_json=json_output)
        return
    with progress_reporter(enabled=not no_progress) as reporter:
        result = compare_files(
            inputs,
            store_root=store,
            top=top,
            per_row=per_row,
            sample=sample,
            seed=seed,
            reporter=reporter,
            csv_file=csv_file,
            json_file=json_file,
            plot=plot,
        )
    render.comparison(result, as_json=json_output)


def _compare_directions(
    ctx: typer.Context,
    kind: str,
    inputs: list[str],
    store: Path | None,
    position: int,
    ranks: str,
    model: str | None,
    csv_file: Path | None,
    json_file: Path | None,
    plot: Path | None,
    json_output: bool,
) -> None:
    """Two mean sets: the candidates' cosines across layers; a direction edit and rank
    statistics: the share of r in each writer's top output subspace."""
    from wandacli.core.errors import ConfigError
    from wandacli.reporting import directions
    from wandacli.reporting.subspaces import parse_ranks

    if kind == "cosines":
        cosines = directions.direction_cosines(
            inputs[0], inputs[1], store_root=store, position=position
        )
        directions.write_rows(cosines.rows(), csv_file, json_file, cosines.to_json())
        if plot is not None:
            from wandacli.reporting.figures import direction_cosines_heatmap
            from wandacli.reporting.labels import plot_format

            direction_cosines_heatmap(
                cosines.cosines,
                inputs[0],
                inputs[1],
                position,
                plot.with_suffix(""),
                (plot_format(plot),),
            )
        render.direction_cosines(cosines, as_json=json_output)
        return
    if model is None:
        raise ConfigError(
            "a direction against rank statistics needs --model (its weights give each "
            "module's output subspace)"
        )
    shares = directions.direction_in_subspaces(
        inputs[0], inputs[1], store_root=store, model=model_spec(ctx.params),
        rank=parse_ranks(ranks)[0],
    )  # fmt: skip
    directions.write_rows(shares.rows(), csv_file, json_file, shares.to_json())
    render.direction_in_subspaces(shares, as_json=json_output)
