"""One registry of what reporting names and writes: module names as figures and heatmaps show
them, the figure formats, and the checks on a file about to be written. The metric names and
their order live one floor down, in core/metrics.py, because evaluation writes them too."""

from __future__ import annotations

from pathlib import Path

from wandacli.core.errors import ConfigError

# Every figure is written in both; `compare --plot FILE` picks one by the file's suffix.
PLOT_FORMATS = ("png", "svg")


def plot_format(path: Path) -> str:
    """The figure format `compare --plot` writes, from the file's suffix; checked before any
    comparison is computed."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise ConfigError(f"--plot {path}: name a .png or .svg file")
    return fmt


def output_path(path: Path) -> Path:
    """A file compare can write: not a directory, in a directory that exists."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: pass a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def short_module_name(module: str) -> str:
    """`self_attn.q_proj` → `q`, `mlp.down_proj` → `down`, `attn.c_attn` → `c_attn`."""
    return module.rsplit(".", 1)[-1].removesuffix("_proj")
