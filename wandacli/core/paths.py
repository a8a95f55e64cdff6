"""Where wandacli keeps what it makes once (converted models, downloads), and the checks on
a file a command is about to write."""

from __future__ import annotations

import os
from pathlib import Path

from wandacli.core.errors import ConfigError

# Every figure is written in both; `compare --plot FILE` picks one by the file's suffix.
PLOT_FORMATS = ("png", "svg")


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where converted GGUF models, the aligned organism and downloaded data sets live:
    --cache-dir, $WANDACLI_CACHE_DIR, or the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("WANDACLI_CACHE_DIR"):
        return Path(os.environ["WANDACLI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wandacli"


def plot_format(path: Path) -> str:
    """The figure format a `--plot FILE` writes, from the file's suffix; checked before any
    work is done."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise ConfigError(f"--plot {path}: name a .png or .svg file")
    return fmt


def output_path(path: Path) -> Path:
    """A file a command can write: not a directory, in a directory that exists."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: pass a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: {path.parent} is a file, not a directory")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path
