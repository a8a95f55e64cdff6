"""Run every bench/bench_*.py, print one table of ratios with their targets, and write
bench/results.json."""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import Row  # noqa: E402


def main(selected: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    scripts = sorted((REPO / "bench").glob("bench_*.py"))
    rows: list[Row] = []
    for script in scripts:
        name = script.stem
        if selected and name not in selected:
            continue
        module = importlib.import_module(f"bench.{name}")
        if getattr(module, "STANDALONE", False) and name not in selected:
            continue  # long and installs a peer (bench_heretic): run when named
        console.print(f"[bold]running {name}[/bold]", highlight=False)
        started = time.perf_counter()
        rows.extend(module.run())
        console.print(f"  done in {time.perf_counter() - started:.0f} s", highlight=False)
    table = Table(title="wandacli benchmarks (ratios measured side by side in one run)")
    for column in ("benchmark", "ratio", "target", "ok", "measured"):
        table.add_column(column, overflow="fold")
    for row in rows:
        ok = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[row.meets_target]
        table.add_row(row.benchmark, f"{row.ratio:.2f}", row.target, ok, row.detail)
    console.print(table)
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "torch": torch.__version__,
        },
        "rows": [row.to_json() for row in rows],
    }
    (REPO / "bench" / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
