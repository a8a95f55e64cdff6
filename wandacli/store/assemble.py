"""The one assembly loop: a finished file written layer by layer under a temporary name, every
array refused if it holds NaN or Inf, the meta set last, then renamed into place (`score`
and `import-legacy` both write their sets through it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wandacli.core.console import Reporter
from wandacli.core.durable import atomic_h5
from wandacli.store.files import non_finite_counts, set_root_attrs, to_float16_checked, write_array


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
