"""What a mask run and an edit run report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PruneResult:
    """What a finished prune reports."""

    name: str
    path: Path
    mode: str
    counts: dict[str, tuple[int, int]]  # key -> (pruned, total)
    seconds: float
    peak_memory_bytes: int
    model_zero_fraction: float | None = None  # exact zeros in the pruned model's linear weights
    saved_model: Path | None = None
    exported_mask: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    already_complete: bool = False  # a finished mask with the same settings: nothing computed

    @property
    def pruned(self) -> int:
        return sum(p for p, _ in self.counts.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.counts.values())

    @property
    def sparsity(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "already_complete": self.already_complete,
            "path": str(self.path),
            "mode": self.mode,
            "pruned": self.pruned,
            "total": self.total,
            "sparsity": self.sparsity,
            "model_zero_fraction": self.model_zero_fraction,
            "saved_model": str(self.saved_model) if self.saved_model else None,
            "exported_mask": str(self.exported_mask) if self.exported_mask else None,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "modules": {k: {"pruned": p, "total": t} for k, (p, t) in self.counts.items()},
        }


@dataclass
class EditResult:
    name: str
    path: Path
    mode: str
    modules: int
    removed_rank_fraction: float
    seconds: float
    peak_memory_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)
    saved_model: Path | None = None
    already_complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "already_complete": self.already_complete,
            "path": str(self.path),
            "mode": self.mode,
            "modules": self.modules,
            "removed_rank_fraction": self.removed_rank_fraction,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "saved_model": str(self.saved_model) if self.saved_model else None,
            "ranks": self.meta.get("modules", {}),
        }
