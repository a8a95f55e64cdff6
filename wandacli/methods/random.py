"""random: seeded uniform scores per matrix, the control for every other method."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from wandacli.data.calibration import CalibrationSet
from wandacli.methods.base import ScoreMethod
from wandacli.models.layers import LinearLayer
from wandacli.store.assemble import LayerArray, LayerLink


class RandomMethod(ScoreMethod):
    name = "random"

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        scores = random_scores(lin.shape, self.config.seed, lin.key).numpy()
        yield LayerArray(lin.key, scores, is_scores=True)


def random_scores(shape: tuple[int, int], seed: int, key: str) -> torch.Tensor:
    """Uniform [0, 1) scores from a generator seeded by (seed, layer/module), so a layer's scores
    do not depend on which layers were computed before it (resume, filters)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    generator = torch.Generator().manual_seed(
        int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    )
    return torch.rand(shape, generator=generator, dtype=torch.float32)
