"""One registry of what reporting names: module names as figures and heatmaps show them. The
metric names and their order live one floor down, in core/metrics.py, because evaluation
writes them too; the figure formats and the checks on a file about to be written in
core/paths.py, because analysis writes files too."""

from __future__ import annotations


def short_module_name(module: str) -> str:
    """`self_attn.q_proj` → `q`, `mlp.down_proj` → `down`, `attn.c_attn` → `c_attn`."""
    return module.rsplit(".", 1)[-1].removesuffix("_proj")
