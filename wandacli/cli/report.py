"""`wandacli report`: the study's table and figures from a results directory."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.outputs import ReportConfig
from wandacli.reporting import render


def _run(config: ReportConfig, **context: Any) -> Any:
    from wandacli.reporting.report import build_report

    return build_report(
        config.results,
        markdown_file=config.markdown_file,
        plots_dir=config.plots,
        compare_dir=config.compare_dir,
        searches_store=config.searches,
    )


report = settings_command(
    "report",
    ReportConfig,
    _run,
    render.report,
    doc="""One table of every model under test: sparsity, attack success rates, perplexity; with
    --plots, the study's figures.""",
    common=("config", "json_output"),
)
