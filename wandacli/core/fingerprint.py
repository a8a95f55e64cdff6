"""A model's fingerprint: its decoder linear layers' names and weight shapes, the identity a
score set or mask is checked against. Plain Python, so readers of the store need no torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelFingerprint:
    """The layer names and weight shapes that score sets and masks must match."""

    shapes: dict[str, tuple[int, int]]  # "<layer>/<module>" -> (out, in)
    num_layers: int
    # The model's family (models/families/): which modules write into the stream, which route.
    # Not part of the identity (the digest): sets made before families were recorded match.
    family: str | None = field(default=None, compare=False)

    @property
    def digest(self) -> str:
        payload = json.dumps(
            {"layers": self.num_layers, "shapes": {k: list(v) for k, v in self.shapes.items()}},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "num_layers": self.num_layers,
            "digest": self.digest,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
        }
        if self.family is not None:
            found["family"] = self.family
        return found

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFingerprint:
        return cls(
            shapes={k: (int(v[0]), int(v[1])) for k, v in data["shapes"].items()},
            num_layers=int(data["num_layers"]),
            family=data.get("family"),
        )

    def first_mismatch(self, other: ModelFingerprint, *, mine: str, theirs: str) -> str | None:
        """A sentence naming the first difference from `other`, or None when they match."""
        if self.num_layers != other.num_layers:
            return f"{mine} has {self.num_layers} layers, {theirs} has {other.num_layers}"
        for key, shape in self.shapes.items():
            if key not in other.shapes:
                return f"{_describe_key(key)}: in {mine} but not in {theirs}"
            if other.shapes[key] != shape:
                return (
                    f"{_describe_key(key)}: {mine} {_fmt_shape(shape)} "
                    f"≠ {theirs} {_fmt_shape(other.shapes[key])}"
                )
        for key in other.shapes:
            if key not in self.shapes:
                return f"{_describe_key(key)}: in {theirs} but not in {mine}"
        return None


def _describe_key(key: str) -> str:
    layer, module = key.split("/", 1)
    return f"layer {layer} {module}"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
