"""Results on stdout: Rich tables for people, JSON for machines."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from wandacli.console import out
from wandacli.store import ScoreSetSummary

if TYPE_CHECKING:
    from wandacli.prune_run import PruneResult
    from wandacli.score_run import ScoreResult


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def print_json(payload: Any) -> None:
    out.print_json(json.dumps(payload, default=str))


def score_result(result: ScoreResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    memory = human_bytes(result.peak_memory_bytes)
    if result.peak_gpu_memory_bytes:
        memory += f" (GPU {human_bytes(result.peak_gpu_memory_bytes)})"
    rows = [
        ("score set", result.name + (" (resumed)" if result.resumed else "")),
        ("method", result.method),
        ("samples", str(result.nsamples) if result.nsamples else "-"),
        ("modules", f"{result.modules} in {result.layers} layers"),
        ("weights scored", f"{result.parameters:,}"),
        ("time", f"{result.seconds:.1f} s"),
        ("peak memory", memory),
        ("file", str(result.path)),
    ]
    out.print(key_value_table("score set written", rows))


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


def store_listing(sets: list[ScoreSetSummary], masks: list[ScoreSetSummary], as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "score_sets": [_summary_json(s) for s in sets],
                "masks": [_summary_json(m) for m in masks],
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
        mask_table = Table(title="masks", title_justify="left")
        for column in ("mask", "status", "mode", "scores", "sparsity"):
            mask_table.add_column(column, overflow="fold")
        for entry in masks:
            meta = entry.meta
            status = (
                "[green]complete[/green]"
                if entry.complete
                else f"[red]{escape(entry.error or '')}[/red]"
            )
            sparsity = meta.get("actual_sparsity")
            mask_table.add_row(
                entry.name,
                status,
                str(meta.get("mode", "-")),
                ", ".join(s.get("name", "?") for s in meta.get("score_sets", [])) or "-",
                f"{sparsity:.4f}" if isinstance(sparsity, float) else "-",
            )
        out.print(mask_table)


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


def prune_result(result: PruneResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    out.print(
        sparsity_table(f"mask {result.name}: sparsity (%) by layer and module", result.counts)
    )
    rows = [
        ("mask", result.name),
        ("mode", result.mode),
        ("pruned", f"{result.pruned:,} of {result.total:,} weights ({100 * result.sparsity:.4f}%)"),
    ]
    if result.model_zero_fraction is not None:
        rows.append(
            (
                "model sparsity",
                f"{100 * result.model_zero_fraction:.4f}% exact zeros in decoder linear weights",
            )
        )
    if result.saved_model is not None:
        rows.append(("saved model", str(result.saved_model)))
    if result.exported_mask is not None:
        rows.append(("exported mask", str(result.exported_mask)))
    rows += [
        ("time", f"{result.seconds:.1f} s"),
        ("peak memory", human_bytes(result.peak_memory_bytes)),
        ("file", str(result.path)),
    ]
    out.print(key_value_table("mask written", rows))
