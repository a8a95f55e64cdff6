"""The Typer group: help formatting, the one place an error becomes a user message."""

from __future__ import annotations

import inspect as inspect_module
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from wandacli import __version__
from wandacli.config.files import config_path_from_args, default_map, read_config_file
from wandacli.core.console import console
from wandacli.core.distributed import rank_prefix
from wandacli.core.errors import Terminated, WandacliError

# Exit codes: 2 for usage and input errors (click's convention), 130/143 for SIGINT/SIGTERM.
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def _report(message: str) -> None:
    message = rank_prefix() + message
    # Messages name things like [score] tables: escape them so Rich prints them verbatim.
    console.print(
        f"[bold red]error:[/bold red] {escape(message)}",
        markup=True,
        highlight=False,
        soft_wrap=True,
    )


def _debug_enabled() -> bool:
    return os.environ.get("WANDACLI_DEBUG") == "1"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _tidy_help(command: Any) -> None:
    """Help text as Rich renders it: docstrings' hard line breaks joined within paragraphs (the
    command list shows each summary whole), and brackets in help strings escaped (Rich would
    read "[default: ...]" as markup and drop it)."""
    if command.help:
        paragraphs = inspect_module.cleandoc(command.help).split("\n\n")
        command.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        command.help = escape(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)


def _flags_without_metavar(params: list[Any]) -> list[Any]:
    """A flag takes no value: show no `<bool>` beside it (`--json <bool>` reads as if
    `--json true` were accepted)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class WandacliCommand(TyperCommand):
    """Every subcommand: tidy help text, flags without a metavar."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))


class WandacliGroup(TyperGroup):
    """Converts every error into one line on stderr and an exit code, for the console script
    and for CliRunner alike. A traceback only with --debug (or WANDACLI_DEBUG=1)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: leave SIGTERM alone
            previous = None
        try:
            return super().invoke(ctx)
        except WandacliError as exc:
            _report_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _report("interrupted")
            raise typer.Exit(EXIT_SIGINT) from None
        except Terminated:
            _report("terminated")
            raise typer.Exit(EXIT_SIGTERM) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:  # a bug: say so in one line, keep the trace for --debug
            _report_error(exc)
            raise typer.Exit(1) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))

    def options_by_command(self) -> dict[str, set[str]]:
        return {name: {p.name for p in cmd.params if p.name} for name, cmd in self.commands.items()}

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            config_path = config_path_from_args(argv)
            if config_path is not None:
                extra["default_map"] = default_map(
                    read_config_file(config_path), self.options_by_command()
                )
            result = super().main(
                args=argv,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except WandacliError as exc:
            _report_error(exc)
            code = exc.exit_code
        except typer.TyperException as exc:  # click's usage errors
            _report(_usage_message(exc))
            code = getattr(exc, "exit_code", EXIT_USAGE)
        except typer.Abort:
            _report("aborted")
            code = EXIT_SIGINT
        else:
            code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_message(exc: Any) -> str:
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(str(message).split())  # one line
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        return f"{message} (see `{ctx.command_path} --help`)"
    return message


def _report_error(exc: BaseException) -> None:
    if _debug_enabled():
        traceback.print_exception(exc)
    if isinstance(exc, WandacliError):
        _report(str(exc))
    else:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        _report(
            f"internal error: {type(exc).__name__}: {detail} "
            "(rerun with --debug for the traceback, and please report it)"
        )


app = typer.Typer(
    cls=WandacliGroup,
    name="wandacli",
    help=(
        "Find which weights of a chat model carry its safety behaviour: score every weight of "
        "every linear layer, keep the scores in an HDF5 store, prune from them, compare masks, "
        "and measure attack success and utility."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wandacli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """wandacli: safety attribution by pruning."""
    if debug:
        os.environ["WANDACLI_DEBUG"] = "1"
