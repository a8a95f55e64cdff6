"""Checkpoint parts of an unfinished score set: the manifest and the part files."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from wandacli.core.durable import (
    atomic_h5,
    atomic_write_text,
)
from wandacli.core.errors import (
    ResumeMismatchError,
    StoreError,
)
from wandacli.core.provenance import settings_differences
from wandacli.store.assemble import set_root_attrs, write_array
from wandacli.store.files import StoredFile
from wandacli.store.schema import PART_FORMAT, PARTS_MANIFEST_FORMAT

# ---------------------------------------------------------------------------------------------
# Parts of unfinished score sets


MANIFEST_NAME = "manifest.json"


def read_manifest(parts_dir: Path) -> dict[str, Any] | None:
    path = parts_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != PARTS_MANIFEST_FORMAT:
        return None
    return data


def write_manifest(parts_dir: Path, settings: dict[str, Any], extra: dict[str, Any]) -> None:
    atomic_write_text(
        parts_dir / MANIFEST_NAME,
        json.dumps({"format": PARTS_MANIFEST_FORMAT, "settings": settings, **extra}, indent=1),
    )


def check_resumable(parts_dir: Path, settings: dict[str, Any], name: str) -> bool:
    """True when there is unfinished work to resume with the same settings; refuses otherwise."""
    if not parts_dir.is_dir():
        return False
    manifest = read_manifest(parts_dir)
    if manifest is None:
        # A parts directory without a readable manifest holds nothing we can trust.
        shutil.rmtree(parts_dir, ignore_errors=True)
        return False
    differences = settings_differences(manifest.get("settings", {}), settings)
    if differences:
        raise ResumeMismatchError(
            f"unfinished score set {name!r} was started with other settings "
            f"({'; '.join(differences)}): rerun with the same settings to resume, "
            "--overwrite to discard it, or --name to start another set"
        )
    return True


def describe_parts(parts_dir: Path) -> str:
    manifest = read_manifest(parts_dir) or {}
    done = []
    stats = sorted(parts_dir.glob("stats-*.h5"))
    if stats:
        done.append(f"{int(stats[-1].stem.split('-')[1])} samples of statistics")
    groups = sorted(parts_dir.glob("group-*.h5"))
    total_groups = manifest.get("groups")
    if groups or total_groups:
        done.append(f"{len(groups)}/{total_groups or '?'} layer groups")
    return "unfinished: " + (", ".join(done) if done else "nothing kept yet")


def write_part(
    path: Path,
    arrays: Iterable[tuple[str, np.ndarray]],
    attrs: dict[str, Any],
    reserve_bytes: int | None = None,
) -> None:
    """A part file: arrays under their keys (consumed one at a time, so a generator keeps
    memory at one array), attributes as meta; atomic and checksummed."""
    with atomic_h5(path, reserve_bytes) as handle:
        for key, array in arrays:
            # float64 sums (actsvd) stay float64: a resume must continue from the exact sums.
            write_array(handle, key, array, "float64" if array.dtype == np.float64 else "float32")
        set_root_attrs(handle, PART_FORMAT, attrs)


def read_part(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """A part's arrays and attributes, or None (and the file removed) when it is damaged."""
    part = open_part(path)
    if part is None:
        return None
    with part:
        try:
            arrays = {key: part.read_raw(key) for key in part.all_dataset_keys()}
        except StoreError:
            part.close()
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return arrays, part.meta


def open_part(path: Path) -> StoredFile | None:
    """A part file opened for reading one array at a time, or None (and the file removed)
    when it cannot be opened: a truncated part is recomputed, never trusted."""
    try:
        return StoredFile(path, PART_FORMAT, ("float32", "float64"))
    except StoreError:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
