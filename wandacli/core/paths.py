"""Where wandacli keeps what it makes once (converted models, downloads)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where converted GGUF models, the aligned organism and downloaded data sets live:
    --cache-dir, $WANDACLI_CACHE_DIR, or the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("WANDACLI_CACHE_DIR"):
        return Path(os.environ["WANDACLI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wandacli"
