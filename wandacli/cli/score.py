"""`wandacli score`: attribution scores, rank statistics or mean activations into the store."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.score import ScoreConfig
from wandacli.reporting import render


def _run(config: ScoreConfig, **context: Any) -> Any:
    from wandacli.scoring.run import run_score

    result = run_score(config, **context)
    return result if result.rank == 0 else None  # one report for a multi-process run


score = settings_command(
    "score",
    ScoreConfig,
    _run,
    render.score_result,
    doc="""Compute a score for every weight of every decoder linear layer and write a score set.

    Resumable: an interrupted run keeps its finished work; the same command resumes it.
    """,
)
