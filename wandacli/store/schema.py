"""The store's layout and formats, written down here and nowhere else."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wandacli.core.errors import (
    StoreError,
)

FORMAT_VERSION = 1
SCORES_FORMAT = "wandacli-scores"
RANK_STATS_FORMAT = "wandacli-rank-statistics"
MASK_FORMAT = "wandacli-mask"
EDIT_FORMAT = "wandacli-edit"
PART_FORMAT = "wandacli-part"
PARTS_MANIFEST_FORMAT = "wandacli-parts"

SCORES_DIR = "scores"
MASKS_DIR = "masks"
EDITS_DIR = "edits"
PARTS_SUFFIX = ".parts"
LOCK_NAME = ".wandacli.lock"
LOCK_HOLDER_NAME = ".wandacli.lock.json"

STATS_GROUP = "stats"
# HDF5 filters a store file may use: deflate (1), shuffle (2), fletcher32 (3). Anything else
# could be a plugin we do not want to load for a file someone handed us.
ALLOWED_FILTER_IDS = frozenset({1, 2, 3})
MAX_META_BYTES = 1 << 20  # 1 MiB: meta is settings, not data
FLOAT16_MAX = 65504.0
# Target chunk size for score arrays: whole rows, about 1 MiB a chunk.
CHUNK_BYTES = 1 << 20

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,@-]*$")
_LAYER_PATTERN = re.compile(r"^\d+$")


# ---------------------------------------------------------------------------------------------
# Names and paths


def check_name(name: str, what: str = "score set") -> str:
    """A set or mask name usable as a file name on every platform."""
    if not _NAME_PATTERN.match(name) or name.endswith(PARTS_SUFFIX) or len(name) > 200:
        raise StoreError(
            f"invalid {what} name {name!r}: use letters, digits and . _ - + = , @ "
            "(not starting with a dot)"
        )
    return name


@dataclass(frozen=True)
class Store:
    """Paths inside one store directory."""

    root: Path

    @property
    def scores_dir(self) -> Path:
        return self.root / SCORES_DIR

    @property
    def masks_dir(self) -> Path:
        return self.root / MASKS_DIR

    def score_set_path(self, name: str) -> Path:
        return self.scores_dir / f"{check_name(name)}.h5"

    def parts_dir(self, name: str) -> Path:
        return self.scores_dir / f"{check_name(name)}{PARTS_SUFFIX}"

    def mask_path(self, name: str) -> Path:
        return self.masks_dir / f"{check_name(name, 'mask')}.h5"

    @property
    def edits_dir(self) -> Path:
        return self.root / EDITS_DIR

    def edit_path(self, name: str) -> Path:
        return self.edits_dir / f"{check_name(name, 'edit')}.h5"

    def edit_names(self) -> list[str]:
        if not self.edits_dir.is_dir():
            return []
        return sorted(p.stem for p in self.edits_dir.glob("*.h5") if not p.name.startswith("."))

    def score_set_names(self) -> list[str]:
        if not self.scores_dir.is_dir():
            return []
        return sorted(p.stem for p in self.scores_dir.glob("*.h5") if not p.name.startswith("."))

    def unfinished_names(self) -> list[str]:
        if not self.scores_dir.is_dir():
            return []
        return sorted(
            p.name[: -len(PARTS_SUFFIX)]
            for p in self.scores_dir.glob(f"*{PARTS_SUFFIX}")
            if p.is_dir() and not p.name.startswith(".")
        )

    def mask_names(self) -> list[str]:
        if not self.masks_dir.is_dir():
            return []
        return sorted(p.stem for p in self.masks_dir.glob("*.h5") if not p.name.startswith("."))


def split_key(key: str) -> tuple[int, str]:
    layer, module = key.split("/", 1)
    return int(layer), module


def describe_key(key: str) -> str:
    layer, module = split_key(key)
    return f"layer {layer} {module}"


# ---------------------------------------------------------------------------------------------
# Writing score sets, parts and masks


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of whole rows, about CHUNK_BYTES each."""
    rows, cols = shape
    per_chunk = max(1, min(rows, CHUNK_BYTES // max(1, cols * itemsize)))
    return (per_chunk, cols)


def _format_noun(fmt: str) -> str:
    return {
        SCORES_FORMAT: "score set",
        RANK_STATS_FORMAT: "rank-statistics set",
        MASK_FORMAT: "mask",
        EDIT_FORMAT: "edit",
        PART_FORMAT: "part file",
    }.get(fmt, "file")
