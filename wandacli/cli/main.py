"""The console-script entry point: every command registered on the app."""

from __future__ import annotations

import os
import sys
from typing import Any

from wandacli.cli import (
    check_config,
    compare,
    evaluate,
    finetune,
    inspect,
    legacy,
    pipeline,
    prune,
    report,
    score,
    search,
)
from wandacli.cli.app import EXIT_SIGINT, EXIT_SIGTERM, WandacliCommand, _debug_enabled, app

# Every command on the app, in the order `wandacli --help` lists them.
app.command(cls=WandacliCommand)(score.score)
app.command(cls=WandacliCommand)(prune.prune)
app.command(cls=WandacliCommand)(compare.compare)
app.command("eval-attack", cls=WandacliCommand)(evaluate.eval_attack)
app.command("eval-utility", cls=WandacliCommand)(evaluate.eval_utility)
app.command(cls=WandacliCommand)(search.search)
app.command(cls=WandacliCommand)(finetune.finetune)
app.command(cls=WandacliCommand)(report.report)
app.command(cls=WandacliCommand)(pipeline.pipeline)
app.command("import-legacy", cls=WandacliCommand)(legacy.import_legacy_command)
app.command("check-config", cls=WandacliCommand)(check_config.check_config)
app.command(cls=WandacliCommand)(inspect.inspect)


def _quiet_unraisable(unraisable: Any) -> None:
    """After a failed write, h5py retries closing the file when the object is freed and prints
    the same I/O error again as an "exception ignored" traceback; the user already has the
    one-line error. Shown with --debug."""
    if _debug_enabled():
        sys.__unraisablehook__(unraisable)


def main() -> None:
    """Console-script entry point."""
    sys.unraisablehook = _quiet_unraisable
    try:
        app()
    except SystemExit as exc:
        if exc.code in (EXIT_SIGINT, EXIT_SIGTERM):
            # A KeyboardInterrupt that crossed C code while importing (torch, transformers)
            # leaves CPython resolved to re-kill itself with SIGINT at exit, whatever we
            # return; the interruption is handled and reported, so exit with our code now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(exc.code))
        raise
