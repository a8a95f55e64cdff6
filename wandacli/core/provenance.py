"""What every result records about how it was made (time, software, settings), and the one
check that a finished file was made for the request now."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wandacli.core.errors import StoreError


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    """Versions recorded in every file's meta, read from package metadata (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("wandacli", "torch", "transformers", "numpy", "h5py"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def settings_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'name: old → new' for every setting that differs (in nested settings too, by dotted
    name). A dtype recorded as `auto` was made before requests recorded the dtype used: it
    is taken as the dtype `auto` means now."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{d}" for d in settings_differences(old, new)]
        elif old != new and not (key.endswith("dtype") and old == "auto"):
            differences.append(f"{key}: {_short(old)} → {_short(new)}")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def request_differences(
    meta: dict[str, Any],
    current: dict[str, Any],
    normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[str]:
    """What differs between the request a finished file was made for (its meta's `config`,
    through `normalise` to the part that changes the numbers) and the request now."""
    stored = meta.get("config")
    if not isinstance(stored, dict):
        return ["settings: not recorded (made by an older wandacli)"]
    return settings_differences(normalise(stored) if normalise else stored, current)


def refuse_other_request(noun: str, name: str, root: Path, differences: list[str]) -> None:
    """The one answer to "is this request already finished?" when it is not the same request:
    `score`, `prune` and rank edits on a name that holds a file made with other settings."""
    if differences:
        raise StoreError(
            f"{noun} {name!r} already exists in {root} with other settings "
            f"({'; '.join(differences[:4])}): pass --overwrite to recompute it, or --name to "
            "write another"
        )
