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
from wandacli.store.schema import SEARCH_SUMMARY, Store
from wandacli.store.summaries import SearchSummary


@dataclass
class ScoreSetSummary:
    """What `inspect` shows for one score set, finished or not."""

    name: str
    path: Path
    complete: bool
    meta: dict[str, Any] = field(default_factory=dict)
    progress: str = ""
    error: str | None = None


def _summaries(names: list[str], path_of: Any, opener: Any, verify: bool) -> list[ScoreSetSummary]:
    """Each finished file's meta, or the reason it cannot be read (with `verify`, every
    array read: a checksum failure anywhere marks the file damaged)."""
    found: list[ScoreSetSummary] = []
    for name in names:
        path = path_of(name)
        try:
            with opener(path) as stored:
                if verify:
                    stored.verify()
                state = "complete, every checksum verified" if verify else "complete"
                found.append(ScoreSetSummary(name, path, True, stored.meta, state))
        except StoreError as exc:
            found.append(ScoreSetSummary(name, path, False, error=str(exc)))
    return found


@dataclass
class StoreSummary:
    sets: list[ScoreSetSummary]
    masks: list[ScoreSetSummary]
    edits: list[ScoreSetSummary]
    searches: list[dict[str, Any]]


def search_summaries(store: Store) -> list[dict[str, Any]]:
    """Each search's name, kind, trials asked and complete, and its front's size."""
    found: list[dict[str, Any]] = []
    for name in store.search_names():
        path = store.search_dir(name) / SEARCH_SUMMARY
        try:
            summary = SearchSummary.read(path)
        except StoreError as exc:
            found.append({"name": name, "path": str(path), "error": str(exc)})
            continue
        found.append(
            {
                "name": name,
                "path": str(path.parent),
                "kind": summary.kind,
                "trials_asked": summary.trials_asked or None,
                "complete_trials": len(summary.complete_trials),
                "front": len(summary.front),
                "kept": summary.kept,
                "updated": summary.other.get("updated"),
            }
        )
    return found


def summarize_store(root: Path, *, verify: bool = False) -> StoreSummary:
    """The score and rank-statistics sets, masks, edits and searches in a store, each with
    its meta or the reason it cannot be read; with `verify`, every array's checksum checked
    (a finished file's checksums are otherwise checked as readers reach each array)."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"store {root} is a file, not a directory: pass the store's directory")
    if not root.is_dir():
        raise StoreError(f"store {root} does not exist: pass the directory given to --store")
    store = Store(root)
    sets = _summaries(store.score_set_names(), store.score_set_path, open_finished_scores, verify)
    for name in store.unfinished_names():
        parts = store.parts_dir(name)
        manifest = read_manifest(parts)
        progress = describe_parts(parts)
        sets.append(ScoreSetSummary(name, parts, False, manifest or {}, progress))
    masks = _summaries(store.mask_names(), store.mask_path, MaskFile, verify)
    edits = _summaries(store.edit_names(), store.edit_path, EditFile, verify)
    return StoreSummary(sets, masks, edits, search_summaries(store))
