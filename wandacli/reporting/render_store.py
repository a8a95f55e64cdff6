"""Terminal tables for the store: listings, score-set and sparsity tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from wandacli.core.console import out
from wandacli.store.inspect import ScoreSetSummary, StoreSummary


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column table for a single result (readable at 80 columns)."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _describe_data(meta: dict[str, Any]) -> str:
    data = meta.get("data")
    if not data:
        return "-"
    mode = "" if meta.get("disentangle") else ", entangled"
    template = "" if meta.get("template", "raw") == "raw" else f", {meta.get('template')}"
    return f"{data.get('name')}{mode}{template}"


def store_listing(summary: StoreSummary, as_json: bool) -> None:
    sets, masks, edits, searches = summary.sets, summary.masks, summary.edits, summary.searches
    if as_json:
        print_json(
            {
                "score_sets": [_summary_json(s) for s in sets],
                "masks": [_summary_json(m) for m in masks],
                "edits": [_summary_json(e) for e in edits],
                "searches": searches,
            }
        )
        return
    table = Table(title="score sets", title_justify="left")
    table.add_column("set", no_wrap=True)
    for column in ("status", "method", "data", "samples", "seed", "model"):
        table.add_column(column, overflow="fold")
    for entry in sets:
        meta = entry.meta
        settings = meta.get("settings", {}) if not entry.complete else {}
        status = (
            "[green]complete[/green]"
            if entry.complete
            else f"[yellow]{escape(entry.error or entry.progress)}[/yellow]"
        )
        model = meta.get("model")
        table.add_row(
            entry.name,
            status,
            str(meta.get("method") or settings.get("method") or "-"),
            _describe_data(meta) if entry.complete else str(settings.get("data", "-")),
            str(meta.get("nsamples") or settings.get("nsamples") or "-"),
            str(meta.get("seed", settings.get("seed", "-"))),
            str(model.get("id") if isinstance(model, dict) else settings.get("model", "-")),
        )
    out.print(table)
    if masks:
        out.print(
            _removals_table(
                "masks",
                ("mask", "status", "mode", "scores", "sparsity"),
                masks,
                "score_sets",
                lambda meta: _fraction(meta.get("actual_sparsity"), "{:.4%}"),
            )
        )
    if edits:
        out.print(
            _removals_table(
                "edits",
                ("edit", "status", "mode", "made from", "rank removed"),
                edits,
                "rank_statistics",
                lambda meta: _fraction(meta.get("removed_rank_fraction"), "{:.3%}"),
            )
        )
    if searches:
        table = Table(title="searches", title_justify="left")
        for column in ("search", "kind", "complete trials", "front", "kept"):
            table.add_column(column, overflow="fold")
        for search in searches:
            if search.get("error"):
                table.add_row(search["name"], f"[red]{escape(search['error'])}[/red]", "", "", "")
                continue
            table.add_row(
                search["name"],
                str(search.get("kind") or "-"),
                f"{search['complete_trials']} of {search.get('trials_asked') or '?'}",
                str(search["front"]),
                ", ".join(search["kept"]) or "-",
            )
        out.print(table)


def _fraction(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, float) else "-"


def _removals_table(
    title: str,
    columns: tuple[str, ...],
    entries: list[ScoreSetSummary],
    sources_key: str,
    amount: Any,
) -> Table:
    """Masks or edits: name, status, mode, the sets they were made from, how much they remove."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for entry in entries:
        meta = entry.meta
        status = (
            "[green]complete[/green]"
            if entry.complete
            else f"[red]{escape(entry.error or '')}[/red]"
        )
        table.add_row(
            entry.name,
            status,
            str(meta.get("mode", "-")),
            ", ".join(s.get("name", "?") for s in _sources(meta, sources_key)) or "-",
            amount(meta),
        )
    return table


def _sources(meta: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """What a mask or edit was made from: its score sets or rank statistics, a direction's
    two mean-activations sets, a control's matched mask or edit."""
    for found in (meta.get(key), meta.get("mean_activations")):
        if found:
            return list(found)
    matched = meta.get("matched_edit") or meta.get("matched_mask")
    if matched:
        return [{"name": matched.get("name") or Path(str(matched.get("path"))).stem}]
    return []


def _summary_json(entry: ScoreSetSummary) -> dict[str, Any]:
    return {
        "name": entry.name,
        "path": str(entry.path),
        "complete": entry.complete,
        "progress": entry.progress,
        "error": entry.error,
        "meta": entry.meta,
    }


def sparsity_table(title: str, counts: dict[str, tuple[int, int]]) -> Table:
    """Sparsity (%) per layer (rows) and module (columns), with totals."""
    modules: list[str] = []
    by_layer: dict[int, dict[str, tuple[int, int]]] = {}
    for key, value in counts.items():
        layer_text, module = key.split("/", 1)
        if module not in modules:
            modules.append(module)
        by_layer.setdefault(int(layer_text), {})[module] = value
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    for module in modules:
        table.add_column(module.rsplit(".", 1)[-1].removesuffix("_proj"), justify="right")
    table.add_column("all", justify="right", style="bold")

    def percent(pruned: int, total: int) -> str:
        return f"{100 * pruned / total:.2f}" if total else "-"

    for layer in sorted(by_layer):
        row = by_layer[layer]
        cells = [percent(*row[m]) if m in row else "-" for m in modules]
        table.add_row(
            str(layer),
            *cells,
            percent(sum(p for p, _ in row.values()), sum(t for _, t in row.values())),
        )
    column_totals = []
    for module in modules:
        pairs = [by_layer[layer][module] for layer in by_layer if module in by_layer[layer]]
        column_totals.append(percent(sum(p for p, _ in pairs), sum(t for _, t in pairs)))
    pruned = sum(p for p, _ in counts.values())
    total = sum(t for _, t in counts.values())
    table.add_section()
    table.add_row("all", *column_totals, percent(pruned, total), style="bold")
    return table


def print_json(payload: Any) -> None:
    out.print_json(json.dumps(payload, default=str))
