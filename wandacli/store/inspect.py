"""What a store holds, summarised for `wandacli inspect`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.core.errors import (
    StoreError,
)
from wandacli.store.files import EditFile, MaskFile, open_finished_scores
from wandacli.store.parts import describe_parts, read_manifest
from wandacli.store.schema import Store


@dataclass
class ScoreSetSummary:
    """What `inspect` shows for one score set, finished or not."""

    name: str
    path: Path
    complete: bool
    meta: dict[str, Any] = field(default_factory=dict)
    progress: str = ""
    error: str | None = None


def _summaries(names: list[str], path_of: Any, opener: Any) -> list[ScoreSetSummary]:
    """Each finished file's meta, or the reason it cannot be read."""
    found: list[ScoreSetSummary] = []
    for name in names:
        path = path_of(name)
        try:
            with opener(path) as stored:
                found.append(ScoreSetSummary(name, path, True, stored.meta, "complete"))
        except StoreError as exc:
            found.append(ScoreSetSummary(name, path, False, error=str(exc)))
    return found


def summarize_store(
    root: Path,
) -> tuple[list[ScoreSetSummary], list[ScoreSetSummary], list[ScoreSetSummary]]:
    """(score and rank-statistics sets, masks, edits) in a store, each with its meta or the
    reason it cannot be read."""
    if not root.is_dir():
        raise StoreError(f"store {root} does not exist: pass the directory given to --store")
    store = Store(root)
    sets: list[ScoreSetSummary] = []
    for name in store.score_set_names():
        path = store.score_set_path(name)
        try:
            with open_finished_scores(path) as score_set:
                sets.append(ScoreSetSummary(name, path, True, score_set.meta, "complete"))
        except StoreError as exc:
            sets.append(ScoreSetSummary(name, path, False, error=str(exc)))
    for name in store.unfinished_names():
        parts = store.parts_dir(name)
        manifest = read_manifest(parts)
        progress = describe_parts(parts)
        sets.append(ScoreSetSummary(name, parts, False, manifest or {}, progress))
    masks = _summaries(store.mask_names(), store.mask_path, MaskFile)
    edits = _summaries(store.edit_names(), store.edit_path, EditFile)
    return sets, masks, edits
