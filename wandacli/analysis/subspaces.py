"""`compare` for rank statistics: how much two data sets' top output subspaces overlap, per
layer and module — the reference's rank-level subspace-similarity figure.

For rank-statistics sets A and B (e.g. safety and utility) and a module with weight W, V_a and
V_b are the top r_a and r_b eigenvectors of W C_a Wᵀ and W C_b Wᵀ (removal/ranks.py), and

    φ(r_a, r_b) = ‖V_aᵀ V_b‖_F² / min(r_a, r_b)

is 1 when one subspace contains the other and about max(r_a, r_b)/d_out for random subspaces.
A rank beyond a module's min(d_out, d_in) has no value there (NaN, shown as "-").
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ConfigError, StoreError
from wandacli.removal.ranks import subspace_similarity, top_output_directions
from wandacli.store.files import RankStatistics, open_rank_statistics


def parse_ranks(spec: str) -> tuple[int, ...]:
    """'10,50,100' → (10, 50, 100); one-line errors for anything else."""
    try:
        ranks = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--ranks {spec!r}: give positive integers separated by commas") from None
    if not ranks or any(r < 1 for r in ranks):
        raise ConfigError(f"--ranks {spec!r}: give positive integers separated by commas")
    return tuple(sorted(set(ranks)))


@dataclass
class SubspaceComparison:
    a: str
    b: str
    ranks: tuple[tuple[int, int], ...]  # the (r_a, r_b) pairs computed
    # key -> (r_a, r_b) -> φ
    values: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    full_ranks: dict[str, int] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for key, by_rank in self.values.items():
            layer, module = key.split("/", 1)
            for (rank_a, rank_b), value in by_rank.items():
                rows.append(
                    {
                        "a": self.a,
                        "b": self.b,
                        "layer": layer,
                        "module": module,
                        "rank_a": rank_a,
                        "rank_b": rank_b,
                        "full_rank": self.full_ranks[key],
                        "subspace_similarity": None if math.isnan(value) else value,
                    }
                )
        return rows

    def by_module_type(self, ranks: tuple[int, int]) -> dict[str, float]:
        """The mean over layers of φ at `ranks`, per module type (NaNs left out)."""
        sums: dict[str, list[float]] = {}
        for key, by_rank in self.values.items():
            value = by_rank.get(ranks, math.nan)
            if not math.isnan(value):
                sums.setdefault(key.split("/", 1)[1], []).append(value)
        return {module: sum(v) / len(v) for module, v in sums.items()}

    def grid(self, ranks: tuple[int, int]) -> dict[tuple[int, str], float]:
        """(layer, module) → φ at `ranks`: the heatmap."""
        out = {}
        for key, by_rank in self.values.items():
            layer, module = key.split("/", 1)
            out[(int(layer), module)] = by_rank.get(ranks, math.nan)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "ranks": [list(r) for r in self.ranks],
            "rows": self.rows(),
        }


def compare_subspaces(
    reference_a: str,
    reference_b: str,
    *,
    model: ModelSpec,
    ranks: tuple[int, ...],
    grid: bool = False,
    store_root: Path | None = None,
    reporter: Any = None,
) -> SubspaceComparison:
    """φ per layer and module for every rank (r, r), or every (r_a, r_b) with `grid`."""
    from wandacli.models.loader import load_model

    pairs = (
        tuple((ra, rb) for ra in ranks for rb in ranks) if grid else tuple((r, r) for r in ranks)
    )
    with ExitStack() as stack:
        a = stack.enter_context(open_rank_statistics(reference_a, store_root))
        b = stack.enter_context(open_rank_statistics(reference_b, store_root))
        mismatch = a.fingerprint.first_mismatch(b.fingerprint, mine=a.name, theirs=b.name)
        if mismatch:
            raise StoreError(f"cannot compare rank statistics from different models: {mismatch}")
        loaded = load_model(model)
        a.check_model(loaded.fingerprint, loaded.model_id)
        result = SubspaceComparison(a.name, b.name, pairs)
        if reporter is not None:
            reporter.start("subspaces", total=len(loaded.linear_layers))
        for lin in loaded.linear_layers:
            w = lin.weight_matrix().detach().to(torch.float64)
            full = min(lin.shape)
            result.full_ranks[lin.key] = full
            top = min(max(ranks), full)
            bases = [_directions(w, stats, lin.key, top) for stats in (a, b)]
            result.values[lin.key] = {
                (ra, rb): subspace_similarity(bases[0][:, :ra], bases[1][:, :rb])
                if ra <= full and rb <= full
                else math.nan
                for ra, rb in pairs
            }
            if reporter is not None:
                reporter.advance()
        if reporter is not None:
            reporter.finish()
    return result


def _directions(w: torch.Tensor, stats: RankStatistics, key: str, rank: int) -> torch.Tensor:
    return top_output_directions(w, torch.from_numpy(stats.read(key)).to(w.device), rank)


def are_rank_statistics(references: list[str], store_root: Path | None) -> bool:
    """Whether `compare`'s inputs are rank statistics (any one of them: the rest is checked
    when they are opened)."""
    from wandacli.store.files import resolve_file, stored_format
    from wandacli.store.schema import RANK_STATS_FORMAT

    for reference in references:
        try:
            path = resolve_file(reference, store_root, "score set")
        except StoreError:
            continue
        if stored_format(path) == RANK_STATS_FORMAT:
            return True
    return False


def compare_rank_statistics(
    references: list[str],
    *,
    store_root: Path | None,
    model: ModelSpec | None,
    ranks: str,
    grid: bool,
    csv_file: Path | None = None,
    json_file: Path | None = None,
    reporter: Any = None,
) -> SubspaceComparison:
    """`compare A B` for two rank-statistics sets, with its outputs written."""
    from wandacli.core.paths import output_path

    if len(references) != 2:
        raise ConfigError(
            f"rank statistics are compared two at a time (got {len(references)}): give two sets"
        )
    if model is None:
        raise ConfigError(
            "comparing rank statistics needs the weights: pass --model, the model they were "
            "computed on"
        )
    for target in (csv_file, json_file):
        if target is not None:
            output_path(target)  # refused before the work, not after it
    result = compare_subspaces(
        references[0],
        references[1],
        model=model,
        ranks=parse_ranks(ranks),
        grid=grid,
        store_root=store_root,
        reporter=reporter,
    )
    if csv_file is not None:
        write_csv(result, csv_file)
    if json_file is not None:
        write_json(result, json_file)
    return result


def write_csv(result: SubspaceComparison, path: Path) -> None:
    rows = result.rows()
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def write_json(result: SubspaceComparison, path: Path) -> None:
    path.write_text(json.dumps(result.to_json(), indent=1), encoding="utf-8")
