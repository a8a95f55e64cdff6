"""`wandacli finetune`: the paper's fine-tuning attack, with a mask's weights frozen or
rewound, and the transplant of a mask's weights from an aligned model."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.finetune import FinetuneConfig
from wandacli.reporting import render


def _run(config: FinetuneConfig, *, reporter: Any, command_line: list[str]) -> Any:
    from wandacli.training.finetune import run_finetune

    result = run_finetune(config, reporter=reporter, command_line=command_line)
    return result if result.rank == 0 else None  # one report for a multi-process run


finetune = settings_command(
    "finetune",
    FinetuneConfig,
    _run,
    render.finetune_result,
    doc="""The paper's fine-tuning attack, with a mask's weights frozen, rewound or transplanted.

    Fine-tunes on (prompt, response) pairs, loss on the responses. --freeze MASK keeps a
    stored mask's weights bitwise; --rewind MASK trains freely and puts them back; --transplant
    MASK --from ALIGNED copies them from another model instead of training. Saves a model
    directory eval-attack --model takes.""",
)
