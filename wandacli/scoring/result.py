"""What a score run reports: the set written, its size, time and memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ScoreResult:
    """What a finished run reports."""

    name: str
    path: Path
    method: str
    nsamples: int
    seconds: float
    peak_memory_bytes: int
    peak_gpu_memory_bytes: int | None
    resumed: bool
    layers: int
    modules: int
    parameters: int
    meta: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    already_complete: bool = False  # a finished set with the same settings: nothing computed

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "already_complete": self.already_complete,
            "path": str(self.path),
            "method": self.method,
            "nsamples": self.nsamples,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_gpu_memory_bytes": self.peak_gpu_memory_bytes,
            "resumed": self.resumed,
            "layers": self.layers,
            "modules": self.modules,
            "parameters": self.parameters,
            "world_size": self.world_size,
        }
