"""`wandacli inspect`: what a store holds."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.outputs import InspectConfig
from wandacli.reporting import render_store


def _run(config: InspectConfig, **context: Any) -> Any:
    from wandacli.store.inspect import summarize_store

    return summarize_store(config.root, verify=config.verify)


inspect = settings_command(
    "inspect",
    InspectConfig,
    _run,
    render_store.store_listing,
    doc="""List the score sets, rank statistics and mean activations (finished or not), masks,
    edits and searches in a store, with their metadata.""",
    common=("json_output",),
)
