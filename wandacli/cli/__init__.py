"""The `wandacli` command line: the Typer app, shared options, one module per command.
Each command parses its options, calls one library function and renders the result."""

from wandacli.cli.main import app, main

__all__ = ["app", "main"]
