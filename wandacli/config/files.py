"""TOML config files: reading them and turning them into each command's defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from wandacli.core.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Config files


def read_config_file(path: Path) -> dict[str, Any]:
    """The parsed TOML file, with a one-line error for anything wrong with it."""
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory: pass a .toml file")
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    if path.suffix.lower() != ".toml":
        raise ConfigError(f"--config {path}: config files are TOML; use a .toml file")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from exc


def _normalise(table: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("-", "_"): value for key, value in table.items()}


# Tables a config file holds that are not a command's option defaults: [pipeline] is the
# study's plan (`wandacli pipeline CONFIG` reads it, check-config validates it).
FOREIGN_TABLES = frozenset({"pipeline"})


def default_map(config: dict[str, Any], options_by_command: dict[str, set[str]]) -> dict[str, Any]:
    """Click's `default_map` for the whole app: per command, the top-level keys it has overlaid
    with its own table. Each value is then parsed and validated by the option itself, and flags
    on the command line win. Unknown keys and tables are errors, so a typo never silently falls
    back to a default."""
    known_options = set().union(*options_by_command.values()) if options_by_command else set()
    top = _normalise({k: v for k, v in config.items() if not isinstance(v, dict)})
    for key in top:
        if key not in known_options or key == "config":
            raise ConfigError(
                f"config: unknown key {key!r} (no wandacli command has --{key.replace('_', '-')})"
            )
    for table_name, value in config.items():
        if isinstance(value, dict) and table_name not in set(options_by_command) | FOREIGN_TABLES:
            raise ConfigError(
                f"config: unknown table [{table_name}]: use one of {', '.join(sorted(options_by_command))}"
            )
    result: dict[str, Any] = {}
    for command, options in options_by_command.items():
        table = _normalise(config.get(command, {})) if command not in FOREIGN_TABLES else {}
        for key in table:
            if key not in options or key == "config":
                raise ConfigError(
                    f"config: unknown key {key!r} in [{command}]: `wandacli {command}` has no such option"
                )
        merged = {k: v for k, v in top.items() if k in options}
        merged.update(table)
        if merged:
            result[command] = merged
    return result


def config_path_from_args(args: list[str]) -> Path | None:
    """The value of `--config`/`-c` in a command line, read before parsing so that the file can
    supply the defaults the parser then uses."""
    for index, arg in enumerate(args):
        if arg == "--":
            return None
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
        if arg in ("--config", "-c") and index + 1 < len(args):
            return Path(args[index + 1])
    return None
