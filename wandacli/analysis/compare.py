"""How much masks and score sets agree: overlap and rank metrics as pure array functions, and
the streaming comparison of stored files (one layer at a time, every input at once).

A score set takes part as its top fraction per matrix (`--top`, the set difference's rule:
ranked over the whole matrix, largest first, ties by lower index), or per row (`--per-row`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.paths import output_path
from wandacli.removal.masks import top_fraction
from wandacli.store.files import MaskFile, ModelFile, ScoreSet, resolve_file, stored_format
from wandacli.store.schema import MASK_FORMAT, SCORES_FORMAT

DEFAULT_TOP = 0.01
# Entries sampled per matrix for Spearman's correlation when a matrix is larger: the standard
# error of a rank correlation from 100k pairs is below 0.003.
DEFAULT_SPEARMAN_SAMPLE = 100_000


# ---------------------------------------------------------------------------------------------
# Pure metrics


@dataclass(frozen=True)
class Overlap:
    """Set sizes of two masks over the same weights."""

    size_a: int
    size_b: int
    intersection: int

    @property
    def a_minus_b(self) -> int:
        return self.size_a - self.intersection

    @property
    def b_minus_a(self) -> int:
        return self.size_b - self.intersection

    @property
    def union(self) -> int:
        return self.size_a + self.size_b - self.intersection

    @property
    def jaccard(self) -> float:
        """|A∩B| / |A∪B|; NaN when both are empty (no overlap to speak of)."""
        return self.intersection / self.union if self.union else math.nan

    def __add__(self, other: Overlap) -> Overlap:
        return Overlap(
            self.size_a + other.size_a,
            self.size_b + other.size_b,
            self.intersection + other.intersection,
        )


def overlap(a: np.ndarray, b: np.ndarray) -> Overlap:
    return Overlap(int(a.sum()), int(b.sum()), int(np.logical_and(a, b).sum()))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's coefficient needs)."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2.0  # mean of the ranks ends-count+1 .. ends
    return average[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long vectors (NaN if either is constant)."""
    ranks_a, ranks_b = average_ranks(a.ravel()), average_ranks(b.ravel())
    ranks_a -= ranks_a.mean()
    ranks_b -= ranks_b.mean()
    denominator = math.sqrt(float((ranks_a**2).sum()) * float((ranks_b**2).sum()))
    return float((ranks_a * ranks_b).sum()) / denominator if denominator else math.nan


def sampled_spearman(
    a: np.ndarray, b: np.ndarray, sample: int, seed: int, key: str
) -> tuple[float, str]:
    """(coefficient, "exact" or "sampled N") for two score matrices: exact when they have at
    most `sample` entries, else on `sample` entries drawn uniformly with a seed per matrix."""
    if a.size <= sample:
        return spearman(a, b), "exact"
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    chosen = rng.choice(a.size, size=sample, replace=False)
    return spearman(a.ravel()[chosen], b.ravel()[chosen]), f"sampled {sample}"


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Input:
    """One file being compared: a mask, or a score set turned into its top fraction."""

    label: str
    path: Path
    kind: str  # "mask" or "scores"
    handle: ModelFile

    def load(self, key: str, top: float, per_row: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(the selected weights, the scores or None for a mask) of one layer."""
        if isinstance(self.handle, MaskFile):
            return self.handle.read(key), None
        assert isinstance(self.handle, ScoreSet)
        scores = self.handle.read(key)
        return top_fraction(scores, top, per_row=per_row), scores


def open_input(reference: str, store_root: Path | None, stack: ExitStack) -> Input:
    """A mask or score set, by name or path (the store's one rule), told apart by its format."""
    path = resolve_file(reference, store_root, "score set", "mask")
    fmt = stored_format(path)
    if fmt == SCORES_FORMAT:
        return Input(path.stem, path, "scores", stack.enter_context(ScoreSet(path)))
    if fmt == MASK_FORMAT:
        return Input(path.stem, path, "mask", stack.enter_context(MaskFile(path)))
    # Let the validating reader say precisely what is wrong with it.
    stack.enter_context(ScoreSet(path))
    raise StoreError(f"{path} is neither a wandacli score set nor a mask")


def check_comparable(inputs: list[Input]) -> None:
    """All inputs from one model: same model id and the same layers and shapes."""
    first = inputs[0]
    for other in inputs[1:]:
        mismatch = first.handle.fingerprint.first_mismatch(
            other.handle.fingerprint,
            mine=first.label,
            theirs=other.label,
        )
        if mismatch:
            raise StoreError(f"cannot compare inputs from different models: {mismatch}")
        first_id = first.handle.meta.get("model", {}).get("id")
        other_id = other.handle.meta.get("model", {}).get("id")
        if first_id != other_id:
            raise StoreError(
                f"cannot compare inputs from different models: {first.label} is from {first_id}, "
                f"{other.label} from {other_id}"
            )


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass
class ModuleFigures:
    """Figures for one (layer, module) of one pair of inputs."""

    key: str
    overlap: Overlap
    spearman: float | None = None
    spearman_method: str | None = None


@dataclass
class PairFigures:
    """Everything about one pair of inputs."""

    a: str
    b: str
    modules: list[ModuleFigures] = field(default_factory=list)

    @property
    def overall(self) -> Overlap:
        total = Overlap(0, 0, 0)
        for figures in self.modules:
            total = total + figures.overlap
        return total

    def overall_spearman(self, sizes: dict[str, int]) -> float | None:
        """The mean of the per-matrix coefficients weighted by matrix size."""
        values = [(m.spearman, sizes[m.key]) for m in self.modules if m.spearman is not None]
        values = [(v, w) for v, w in values if not math.isnan(v)]
        if not values:
            return None
        return sum(v * w for v, w in values) / sum(w for _, w in values)


@dataclass
class Comparison:
    inputs: list[Input]
    top: float
    per_row: bool
    sample: int
    pairs: list[PairFigures]
    sizes: dict[str, int]  # weights per (layer/module)

    def jaccard_matrix(self) -> list[list[float]]:
        labels = [i.label for i in self.inputs]
        matrix = [
            [1.0 if i == j else math.nan for j in range(len(labels))] for i in range(len(labels))
        ]
        for pair in self.pairs:
            i, j = labels.index(pair.a), labels.index(pair.b)
            matrix[i][j] = matrix[j][i] = pair.overall.jaccard
        return matrix

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every figure, flat (CSV rows): one per pair and module, plus each pair's overall."""
        for pair in self.pairs:
            for figures in pair.modules:
                layer, module = figures.key.split("/", 1)
                yield _row(
                    pair, layer, module, figures.overlap, figures.spearman, figures.spearman_method
                )
            yield _row(
                pair,
                "all",
                "all",
                pair.overall,
                pair.overall_spearman(self.sizes),
                "size-weighted mean" if self._has_spearman(pair) else None,
            )

    @staticmethod
    def _has_spearman(pair: PairFigures) -> bool:
        return any(m.spearman is not None for m in pair.modules)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [
                {"label": i.label, "path": str(i.path), "kind": i.kind} for i in self.inputs
            ],
            "top": self.top,
            "per_row": self.per_row,
            "spearman_sample": self.sample,
            "jaccard_matrix": [[_finite(v) for v in row] for row in self.jaccard_matrix()],
            "rows": [{k: _finite(v) for k, v in row.items()} for row in self.rows()],
        }


def write_csv(comparison: Comparison, path: Path) -> None:
    """Every figure as CSV: one row per pair and module, plus each pair's overall row."""
    import csv

    rows = list(comparison.rows())
    with output_path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                    for k, v in row.items()
                }
            )


def write_json(comparison: Comparison, path: Path) -> None:
    import json

    output_path(path).write_text(json.dumps(comparison.to_json(), indent=1), encoding="utf-8")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _row(
    pair: PairFigures,
    layer: str,
    module: str,
    figures: Overlap,
    rho: float | None,
    method: str | None,
) -> dict[str, Any]:
    return {
        "a": pair.a,
        "b": pair.b,
        "layer": layer,
        "module": module,
        "size_a": figures.size_a,
        "size_b": figures.size_b,
        "intersection": figures.intersection,
        "a_minus_b": figures.a_minus_b,
        "b_minus_a": figures.b_minus_a,
        "union": figures.union,
        "jaccard": figures.jaccard,
        "spearman": rho,
        "spearman_method": method,
    }


def compare_files(
    references: list[str],
    *,
    store_root: Path | None = None,
    top: float = DEFAULT_TOP,
    per_row: bool = False,
    sample: int = DEFAULT_SPEARMAN_SAMPLE,
    seed: int = 0,
    reporter: Any = None,
    csv_file: Path | None = None,
    json_file: Path | None = None,
) -> Comparison:
    """Compare two or more masks or score sets, streaming layer by layer."""
    if len(references) < 2:
        raise ConfigError("compare needs at least two inputs (masks or score sets)")
    with ExitStack() as stack:
        inputs = [open_input(reference, store_root, stack) for reference in references]
        labels = [i.label for i in inputs]
        if len(set(labels)) != len(labels):
            inputs = [
                Input(f"{i.label}#{n}", i.path, i.kind, i.handle)
                for n, i in enumerate(inputs, start=1)
            ]
        check_comparable(inputs)
        fingerprint = inputs[0].handle.fingerprint
        pairs = [
            PairFigures(inputs[i].label, inputs[j].label)
            for i in range(len(inputs))
            for j in range(i + 1, len(inputs))
        ]
        keys = list(fingerprint.shapes)
        if reporter is not None:
            reporter.start("comparing", total=len(keys))
        for key in keys:
            loaded = [i.load(key, top, per_row) for i in inputs]
            index = 0
            for i in range(len(inputs)):
                for j in range(i + 1, len(inputs)):
                    (selected_a, scores_a), (selected_b, scores_b) = loaded[i], loaded[j]
                    figures = ModuleFigures(key, overlap(selected_a, selected_b))
                    if scores_a is not None and scores_b is not None:
                        figures.spearman, figures.spearman_method = sampled_spearman(
                            scores_a, scores_b, sample, seed, key
                        )
                    pairs[index].modules.append(figures)
                    index += 1
            del loaded
            if reporter is not None:
                reporter.advance()
        if reporter is not None:
            reporter.finish()
        sizes = {key: shape[0] * shape[1] for key, shape in fingerprint.shapes.items()}
        result = Comparison(inputs, top, per_row, sample, pairs, sizes)
    if csv_file is not None:
        write_csv(result, csv_file)
    if json_file is not None:
        write_json(result, json_file)
    return result
