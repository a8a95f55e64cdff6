"""Terminal heatmaps (viridis cells) of per-layer, per-module figures."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from wandacli.reporting.labels import short_module_name

# Viridis at five stops: dark (no overlap) to bright (identical); readable on dark and light
# terminals, and for colour-blind readers.
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _colour(value: float) -> tuple[int, int, int]:
    value = min(1.0, max(0.0, value))
    position = value * (len(_VIRIDIS) - 1)
    low = min(int(position), len(_VIRIDIS) - 2)
    frac = position - low
    a, b = _VIRIDIS[low], _VIRIDIS[low + 1]
    r, g, bl = (round(a[i] + (b[i] - a[i]) * frac) for i in range(3))
    return r, g, bl


def compact_count(n: int) -> str:
    """12,345 → 12.3k, 1,061,550 → 1.06M: counts that fit a column at 80 characters."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f}G"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def jaccard_heatmap(title: str, values: dict[str, float]) -> Table:
    """Layers as rows, modules as columns, each cell the Jaccard index on a colour scale."""
    import math

    modules: list[str] = []
    layers: dict[int, dict[str, float]] = {}
    for key, value in values.items():
        layer_text, module = key.split("/", 1)
        if module not in modules:
            modules.append(module)
        layers.setdefault(int(layer_text), {})[module] = value
    table = Table(title=title, title_justify="left", box=None, padding=(0, 0), show_edge=False)
    table.add_column("layer", justify="right", min_width=5)
    for module in modules:
        table.add_column(short_module_name(module)[:6], justify="center", min_width=6)
    for layer in sorted(layers):
        cells: list[Any] = []
        for module in modules:
            value = layers[layer].get(module, math.nan)
            if math.isnan(value):
                cells.append("  -   ")
                continue
            r, g, b = _colour(value)
            foreground = "black" if value > 0.45 else "white"
            text = f"{value:.2f}".removeprefix("0") if value < 1 else "1.00"
            cells.append(Text(f" {text:>4} ", style=f"{foreground} on rgb({r},{g},{b})"))
        table.add_row(f"{layer} ", *cells)
    return table


def heatmap_legend(label: str = "Jaccard") -> Text:
    legend = Text(f"{label}  0 ")
    for step in range(11):
        r, g, b = _colour(step / 10)
        legend.append("  ", style=f"on rgb({r},{g},{b})")
    legend.append(" 1")
    return legend
