"""`wandacli pipeline`: the study a config describes, as Make rules on stdout."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.pipeline import PipelineRequest, pipeline_rules


def _run(request: PipelineRequest, **context: Any) -> str:
    return pipeline_rules(request)


def _print(rules: str, as_json: bool) -> None:
    import sys

    sys.stdout.write(rules)


pipeline = settings_command(
    "pipeline",
    PipelineRequest,
    _run,
    _print,
    doc="""Print the Make rules of the study a config's [pipeline] table describes.

    One rule per file a step writes (score sets, masks and edits, searches, comparisons,
    evaluations, the report), so that make reruns only what is missing. `make demo` runs
    it.""",
    common=(),
)
