"""`wandacli check-config`: validate a TOML config file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wandacli.cli.app import WandacliGroup, app
from wandacli.config.files import default_map, read_config_file
from wandacli.core.console import console
from wandacli.core.errors import ConfigError


def check_config(
    path: Annotated[Path, typer.Argument(help="A wandacli TOML config file.")],
) -> None:
    """Validate a config file: every key an option of its command, every value of the
    option's type, and a [pipeline] table the Makefile's pipeline can run."""
    from wandacli.pipeline import Plan

    config_data = read_config_file(path)
    group = typer.main.get_command(app)
    assert isinstance(group, WandacliGroup)
    sections = default_map(config_data, group.options_by_command())
    checked = 0
    for name, section in sections.items():
        command = group.commands[name]
        ctx = typer.Context(command, info_name=name)
        params = {p.name: p for p in command.params if p.name}
        for key, value in section.items():
            try:
                params[key].process_value(ctx, value)
            except typer.TyperException as exc:
                message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
                raise ConfigError(
                    f"{path}: [{name}] {key} = {value!r}: {' '.join(message.split())}"
                ) from None
            checked += 1
    if "pipeline" in config_data:
        Plan.from_config(config_data, path)
    console.print(
        f"{path}: {checked} settings for {len(sections)} commands are valid",
        markup=False,
        soft_wrap=True,
    )
