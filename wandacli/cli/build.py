"""Commands made from settings classes: each option's Typer parameter comes from its one
declaration (config/declare.py), so a command function is only "build the settings, call the
library, render the result"."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING
from typing import Annotated, Any

import typer

from wandacli.config.declare import DeclaredField, build, command_text, declared_fields
from wandacli.config.settings import NAMED_CALIBRATION_SETS, NAMED_PROMPT_SETS, CommandOptions
from wandacli.core.console import progress_reporter


def help_text(text: str) -> str:
    """A declared help text with the catalogue of named sets filled in (config/ declares the
    options; the catalogue is data/'s)."""
    from wandacli.data.sources import describe_named_sets

    for marker, purpose in (
        (NAMED_CALIBRATION_SETS, "calibration"),
        (NAMED_PROMPT_SETS, "prompts"),
    ):
        if marker in text:
            text = text.replace(marker, describe_named_sets(purpose))  # type: ignore[arg-type]
    return text


def typer_parameter(found: DeclaredField) -> inspect.Parameter:
    """One option as the Typer parameter that parses it."""
    declared = found.declared
    annotation = declared.cli_type if declared.cli_type is not None else found.type
    if declared.argument:
        info: Any = typer.Argument(help=help_text(declared.help), metavar=declared.metavar)
    else:
        info = typer.Option(
            *declared.flags,
            help=help_text(declared.help),
            rich_help_panel=declared.panel,
            metavar=declared.metavar,
        )
    default = found.default
    if default is MISSING:
        if declared.required is None:  # Click's own "Missing option"
            return inspect.Parameter(
                found.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, info]
            )
        default = None  # missing: `build` says what to pass, in one line
        annotation = annotation | None
    else:
        default = command_text(declared, default)
    return inspect.Parameter(
        found.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[annotation, info],
        default=default,
    )


def common_parameters(*names: str) -> list[inspect.Parameter]:
    """The command options (--config, --json, --no-progress) a command has, by field name."""
    return [typer_parameter(f) for f in declared_fields(CommandOptions) if f.name in names]


def command_line() -> list[str]:
    """How the command was asked for, as results record it."""
    return ["wandacli", *sys.argv[1:]]


def settings_command(
    name: str,
    settings: type,
    run: Callable[..., Any],
    render: Callable[[Any, bool], None],
    *,
    doc: str,
    options: Sequence[DeclaredField] | None = None,
    make: Callable[[dict[str, Any]], Any] | None = None,
    common: Sequence[str] = ("config", "json_output", "no_progress"),
) -> Callable[..., None]:
    """A Typer command: its options are `settings`' declared options (or `options`), plus the
    common --config/--json/--no-progress; it makes the settings from them (`build`, or `make`),
    runs `run(settings, reporter=..., command_line=...)` under a progress display and renders
    the result (unless `run` returns None)."""

    def command(**params: Any) -> None:
        values = make(params) if make is not None else build(settings, params)
        with progress_reporter(enabled=not params.get("no_progress", False)) as reporter:
            result = run(values, reporter=reporter, command_line=command_line())
        if result is not None:
            render(result, params.get("json_output", False))

    found = list(options) if options is not None else list(declared_fields(settings))
    signature = [typer_parameter(f) for f in found] + common_parameters(*common)
    # Python wants parameters without defaults first; the order within each is kept.
    signature.sort(key=lambda p: p.default is not inspect.Parameter.empty)
    command.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    command.__qualname__ = command.__name__
    command.__annotations__ = {}
    # What `check-config` checks a config file's values against besides their types.
    command.declared = {f.name: f for f in found}  # type: ignore[attr-defined]
    return command
