"""What every result records about how it was made: time, software, differing settings."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from typing import Any


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
    """'name: old → new' for every setting that differs."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            differences.append(f"{key}: {_short(stored.get(key))} → {_short(current.get(key))}")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
