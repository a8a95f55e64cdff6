"""One registry of labels: module names, metric names and order, plot formats."""

from __future__ import annotations

from pathlib import Path

from wandacli.core.errors import ConfigError


def output_path(path: Path) -> Path:
    """A file compare can write: not a directory, in a directory that exists."""
    return _output(path)


PLOT_FORMATS = ("png", "svg")


def plot_format(path: Path) -> str:
    """The figure format `compare --plot` writes, from the file's suffix; checked before any
    comparison is computed."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise ConfigError(f"--plot {path}: name a .png or .svg file")
    return fmt


def metric_order(metric: str) -> tuple[int, int, str]:
    order = ["ASR_basic", "ASR_basic_nosys", "ASR_multiple_nosys", "ASR_gcg"]
    variant = 0 if metric.startswith("inst_") else (1 if metric.startswith("no_inst_") else 2)
    base = metric.removeprefix("inst_").removeprefix("no_inst_")
    return (order.index(base) if base in order else len(order), variant, metric)


# ---------------------------------------------------------------------------------------------
# Study figures


def _metric_parts(metric: str) -> tuple[str, bool | None]:
    """`inst_ASR_basic` → (`ASR_basic`, True); `no_inst_…` → False; untagged → None."""
    if metric.startswith("inst_"):
        return metric.removeprefix("inst_"), True
    if metric.startswith("no_inst_"):
        return metric.removeprefix("no_inst_"), False
    return metric, None


def short_module_name(module: str) -> str:
    """`self_attn.q_proj` → `q`, `mlp.down_proj` → `down`, `attn.c_attn` → `c_attn`."""
    return module.rsplit(".", 1)[-1].removesuffix("_proj")


# ---------------------------------------------------------------------------------------------
# report

# The results table's ASR columns at 80 characters: the instruction-tag variant.
REPORT_COLUMNS = (
    ("basic", "inst_ASR_basic"),
    ("no sys", "inst_ASR_basic_nosys"),
    ("multi", "inst_ASR_multiple_nosys"),
    ("gcg", "ASR_gcg"),
)


def _output(path: Path) -> Path:
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: pass a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path
