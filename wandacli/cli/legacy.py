"""`wandacli import-legacy`: the reference code's pickled scores into the store."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.outputs import LegacyImportConfig
from wandacli.reporting import render


def _run(config: LegacyImportConfig, **context: Any) -> Any:
    from wandacli.legacy import import_legacy

    return import_legacy(
        config.directory,
        model=config.model,
        store=config.store,
        name=config.name,
        suffix=config.suffix,
        method=config.method,
        negate=config.negate,
        overwrite=config.overwrite,
        **context,
    )


import_legacy_command = settings_command(
    "import-legacy",
    LegacyImportConfig,
    _run,
    render.legacy_import,
    doc="""Import the reference code's pickled score dumps into a score set, keeping scores you
    already paid for. Never runs code from a pickle: only tensors are rebuilt.""",
)
