"""magnitude: |W| (or |W - W_base| with --use-diff); nothing gathered."""

from __future__ import annotations

from collections.abc import Iterator

from wandacli.data.calibration import CalibrationSet
from wandacli.methods.base import ScoreMethod
from wandacli.models.layers import LinearLayer
from wandacli.store.assemble import LayerArray, LayerLink


class MagnitudeMethod(ScoreMethod):
    name = "magnitude"

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        yield LayerArray(lin.key, self.magnitude(lin, base_layers).cpu().numpy(), is_scores=True)
