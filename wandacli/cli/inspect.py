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
    """List the score sets and rank statistics (finished or not), masks and rank edits in a
    store, with their metadata."""
    sets, masks, edits = summarize_store(store)
    render_store.store_listing(sets, masks, edits, as_json=json_output)
