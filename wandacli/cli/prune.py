"""`wandacli prune`: a mask or an edit from the stored sets, of the kind its options ask for."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.declare import declared_fields
from wandacli.removal.kinds import kind_options
from wandacli.removal.request import RemovalRequest, removal_request
from wandacli.reporting import render


def _run(request: RemovalRequest, **context: Any) -> Any:
    from wandacli.removal.run import run_removal

    return run_removal(request, **context)


def _render(result: Any, as_json: bool) -> None:
    from wandacli.removal.results import EditResult

    if isinstance(result, EditResult):
        render.edit_result(result, as_json=as_json)
    else:
        render.prune_result(result, as_json=as_json)


prune = settings_command(
    "prune",
    RemovalRequest,
    _run,
    _render,
    options=[*declared_fields(RemovalRequest), *kind_options()],
    make=removal_request,
    doc="""Build a mask or an edit from stored sets, keep it in the store, and optionally save
    the model with it applied.

    Its options choose the kind: a mask from scores (a ratio, N:M, the set difference, a
    control of matched counts), a rank edit from rank statistics (removal, the orthogonal
    projection, a control of matched ranks) or the refusal direction from mean activations.
    Never computes scores: run `wandacli score` first.""",
)
