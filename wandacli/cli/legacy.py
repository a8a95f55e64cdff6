"""`wandacli import-legacy`: the reference code's pickled scores into the store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from wandacli.cli.options import (
    CacheDirOption,
    ConfigOption,
    JsonOption,
    NoProgressOption,
    OverwriteOption,
    StoreOption,
    model_spec,
)
from wandacli.config.settings import DEFAULT_STORE
from wandacli.core.console import out, progress_reporter
from wandacli.reporting import render, render_store


def import_legacy_command(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            help="The reference's --save folder (or its wanda_score/) holding W_metric_*.pkl dumps."
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="The model the dumps were computed on (shapes are checked)."
        ),
    ],
    store: StoreOption = DEFAULT_STORE,
    name: Annotated[str, typer.Option("--name", help="Score set name to write.")] = "imported",
    suffix: Annotated[
        str | None,
        typer.Option(
            "--suffix",
            help="Which dumps when several exist, e.g. weight or align_weight_only_disentangle.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="Record this method [default: inferred from the file names]."
        ),
    ] = None,
    negate: Annotated[
        bool,
        typer.Option(
            "--negate", help="Flip the sign (dumps made with --neg_prune hold negated scores)."
        ),
    ] = False,
    cache_dir: CacheDirOption = None,
    overwrite: OverwriteOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Import the reference code's pickled score dumps into a score set, keeping scores you
    already paid for. Never runs code from a pickle: only tensors are rebuilt."""
    from wandacli.legacy import import_legacy

    with progress_reporter(enabled=not no_progress) as reporter:
        result = import_legacy(
            directory,
            model=model_spec(ctx.params),
            store=store,
            name=name,
            suffix=suffix,
            method=method,
            negate=negate,
            overwrite=overwrite,
            reporter=reporter,
            command_line=["wandacli", *sys.argv[1:]],
        )
    if json_output:
        render.print_json(result.to_json())
    else:
        out.print(
            render_store.key_value_table(
                "score set imported",
                [
                    ("score set", result.name),
                    ("method", result.method),
                    ("files", str(result.files)),
                    ("file", str(result.path)),
                ],
            )
        )
