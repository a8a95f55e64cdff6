"""The study's results table: every model under test in a results directory (one
subdirectory each, as eval-attack and eval-utility write them) in one row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.errors import StoreError


@dataclass
class ResultRow:
    label: str
    method: str = "-"
    actual_sparsity: float | None = None
    asr: dict[str, float] = field(default_factory=dict)  # metric name -> ASR
    perplexity: float | None = None
    zero_shot_mean: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "actual_sparsity": self.actual_sparsity,
            "asr": self.asr,
            "perplexity": self.perplexity,
            "zero_shot_mean": self.zero_shot_mean,
        }


def collect(results_dir: Path) -> list[ResultRow]:
    """One row per subdirectory holding results.json and/or utility.json; dense first."""
    if not results_dir.is_dir():
        raise StoreError(
            f"results directory {results_dir} does not exist: run eval-attack or eval-utility with --out inside it"
        )
    rows = []
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        row = ResultRow(folder.name)
        found = False
        for name in ("results.json", "utility.json"):
            path = folder / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise StoreError(
                    f"{path} is not valid JSON ({exc}): rerun the evaluation that wrote it"
                ) from exc
            found = True
            under_test = data.get("model_under_test", {})
            row.method = str(under_test.get("method", row.method))
            row.actual_sparsity = under_test.get("actual_sparsity", row.actual_sparsity)
            for result in data.get("results", []):
                row.asr[str(result["metric"])] = float(result["asr"])
                if result.get("sample_mean") is not None:  # the reference's figure, beside
                    row.asr[f"{result['metric']}_sample_mean"] = float(result["sample_mean"])
            if data.get("perplexity") is not None:
                row.perplexity = float(data["perplexity"])
            if data.get("zero_shot_mean") is not None:
                row.zero_shot_mean = float(data["zero_shot_mean"])
        if found:
            rows.append(row)
    if not rows:
        raise StoreError(
            f"no results in {results_dir}: expected subdirectories with results.json or utility.json"
        )
    rows.sort(key=lambda r: (r.method != "dense", r.label))
    return rows


def markdown(rows: list[ResultRow]) -> str:
    """Every figure as a Markdown table (ASR columns for every metric found)."""
    metrics = sorted({m for row in rows for m in row.asr}, key=_metric_order)
    header = ["model under test", "method", "sparsity %", *metrics, "PPL", "zero-shot"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.label,
            row.method,
            "-" if row.actual_sparsity is None else f"{100 * row.actual_sparsity:.3f}",
            *(f"{row.asr[m]:.3f}" if m in row.asr else "-" for m in metrics),
            "-" if row.perplexity is None else f"{row.perplexity:.3f}",
            "-" if row.zero_shot_mean is None else f"{row.zero_shot_mean:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric_order(metric: str) -> tuple[int, int, str]:
    order = ["ASR_basic", "ASR_basic_nosys", "ASR_multiple_nosys", "ASR_gcg"]
    variant = 0 if metric.startswith("inst_") else (1 if metric.startswith("no_inst_") else 2)
    base = metric.removeprefix("inst_").removeprefix("no_inst_")
    return (order.index(base) if base in order else len(order), variant, metric)
