"""`wandacli inspect`: what a store holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wandacli.cli.options import (
    JsonOption,
)
from wandacli.config.settings import DEFAULT_STORE
from wandacli.reporting import render_store
from wandacli.store.inspect import summarize_store


def inspect(
    store: Annotated[Path, typer.Argument(help="Store directory.")] = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """List the score sets and rank statistics (finished or not), masks, rank edits and
    searches in a store, with their metadata."""
    render_store.store_listing(summarize_store(store), as_json=json_output)
