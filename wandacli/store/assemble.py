"""Writing the store's arrays: checksummed row-chunked datasets, float16 only when safe, the
root attributes, and the one assembly loop. A finished file is written layer by layer under a
temporary name, every array refused if it holds NaN or Inf, the meta set last, then renamed
into place (`score` and `import-legacy` both write their sets through it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wandacli.core.console import Reporter
from wandacli.core.durable import (
    WriteFailed,
    atomic_h5,
)
from wandacli.core.errors import (
    StoreError,
)
from wandacli.store.schema import (
    FLOAT16_MAX,
    FORMAT_VERSION,
    chunk_rows,
    describe_key,
)


@dataclass(frozen=True)
class LayerArray:
    """One array to write at assembly. `scores` arrays may be stored as float16 on request."""

    key: str
    array: np.ndarray
    is_scores: bool = False


@dataclass(frozen=True)
class LayerLink:
    """A second name for an array already written (an HDF5 hard link: stored once)."""

    key: str
    target: str


def assemble(
    final: Path,
    groups: Iterable[Iterable[LayerArray | LayerLink]],
    *,
    total: int,
    reserve_bytes: int,
    file_format: str,
    meta: Callable[[], dict[str, Any]],
    non_finite_error: Callable[[dict[str, tuple[int, int]]], Exception],
    reporter: Reporter,
    label: str,
    float16_scores: bool = False,
) -> None:
    """Write `groups` (one progress step each, typically a layer) into `final` atomically.
    A group whose array holds NaN or Inf is abandoned there, the loop goes on so that the
    error names every such module, and nothing is renamed into place. `meta()` is called
    after the last array, so that it can record when the set was finished."""
    non_finite: dict[str, tuple[int, int]] = {}
    reporter.start(label, total=total)
    with atomic_h5(final, reserve_bytes) as handle:
        for group in groups:
            for item in group:
                if isinstance(item, LayerLink):
                    handle[item.key] = handle[item.target]  # a hard link: stored once
                    continue
                nan, inf = non_finite_counts(item.array)
                if nan or inf:
                    non_finite[item.key] = (nan, inf)
                    break  # nothing more of this group
                if item.is_scores and float16_scores:
                    write_array(
                        handle, item.key, to_float16_checked(item.array, item.key), "float16"
                    )
                else:
                    write_array(handle, item.key, item.array)
            reporter.advance()
        if non_finite:
            raise non_finite_error(non_finite)
        set_root_attrs(handle, file_format, meta())
    reporter.finish()


def non_finite_counts(array: np.ndarray) -> tuple[int, int]:
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def format_non_finite(counts: dict[str, tuple[int, int]]) -> str:
    parts = [f"{describe_key(k)}: {n} NaN, {i} Inf" for k, (n, i) in counts.items()]
    shown = "; ".join(parts[:5]) + (f"; and {len(parts) - 5} more" if len(parts) > 5 else "")
    return shown


def write_array(
    handle: h5py.File | h5py.Group, name: str, array: np.ndarray, dtype: str = "float32"
) -> None:
    """One checksummed, row-chunked array."""
    array = np.ascontiguousarray(array, dtype=dtype)
    kwargs: dict[str, Any] = {"fletcher32": True}
    if array.ndim == 2 and array.size:
        kwargs["chunks"] = chunk_rows(array.shape, array.dtype.itemsize)
    try:
        handle.create_dataset(name, data=array, **kwargs)
    except (OSError, RuntimeError) as exc:  # disk full, file size limit: HDF5's I/O errors
        raise WriteFailed(str(exc)) from exc


def to_float16_checked(array: np.ndarray, key: str) -> np.ndarray:
    """float16 scores, refused when a value would overflow (ties at the cut change masks)."""
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > FLOAT16_MAX:
        raise StoreError(
            f"{describe_key(key)}: score {largest:.4g} exceeds float16's maximum {FLOAT16_MAX:g}; "
            "use --score-dtype float32"
        )
    return array.astype(np.float16)


def set_root_attrs(handle: h5py.File, fmt: str, meta: dict[str, Any]) -> None:
    try:
        handle.attrs["format"] = fmt
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.attrs["meta"] = json.dumps(meta, sort_keys=False, default=str)
    except (OSError, RuntimeError) as exc:
        raise WriteFailed(str(exc)) from exc
