"""`wandacli check-config`: validate a TOML config file."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from wandacli.cli.app import WandacliGroup, app
from wandacli.config.files import default_map, read_config_file
from wandacli.core.console import console
from wandacli.core.errors import ConfigError


def _expects_text(annotation: Any) -> bool:
    """Whether an option takes text (a name, a path, a choice of words): a bare TOML number or
    boolean there is a slip (model = 5), not the text "5"."""
    options = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return bool(options) and all(
        a in (str, Path) or (typing.get_origin(a) is typing.Literal and _expects_text(a))
        for a in options
    )


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
        declared = getattr(command.callback, "declared", {})
        for key, value in section.items():
            where = f"{path}: [{name}] {key} = {value!r}"
            found = declared.get(key)
            text = found is not None and _expects_text(found.declared.cli_type or found.type)
            if text and isinstance(value, (bool, int, float)):
                raise ConfigError(f'{where}: a text is expected here, in quotes ({key} = "...")')
            try:
                processed = params[key].process_value(ctx, value)
            except typer.TyperException as exc:
                message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
                raise ConfigError(f"{where}: {' '.join(message.split())}") from None
            rule = found.declared if found is not None else None
            if rule is not None and rule.check is not None and processed is not None:
                try:
                    rule.check(rule.parse(processed) if rule.parse else processed, rule.flag)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
            checked += 1
    if "pipeline" in config_data:
        Plan.from_config(config_data, path)
    console.print(
        f"{path}: {checked} settings for {len(sections)} commands are valid",
        markup=False,
        soft_wrap=True,
    )
