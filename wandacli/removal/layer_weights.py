"""Per-layer weights of a refusal-direction edit: how much of the direction each decoder layer's
writers lose, per component, as heretic's abliteration shapes it.

A component is one kind of writer: `attention` (the attention output projections) or `mlp` (the
MLP's down projections and the experts' down projections), as the model's family declares
(models/families/). Per component the weight of decoder layer i is a kernel over layers:

    d = |i − position|
    weight(i) = max_weight · (1 − (d / distance) · (1 − min_weight))    where d ≤ distance
              = 0 (the layer is left as it is)                           where d > distance

`min_weight` is a fraction of `max_weight` (the weight falls linearly from max_weight at
`position` to min_weight · max_weight at `distance` layers from it); `position` and `distance`
are in layers and may be fractional. A component with no kernel option given keeps weight 1 on
every layer: the reference's edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

COMPONENTS = ("attention", "mlp")
RULE = (
    "per component (attention writers; MLP and expert writers), decoder layer i's writers lose "
    "α · w(i) of the direction: d = |i − max_weight_position|; w = max_weight · (1 − (d / "
    "min_weight_distance) · (1 − min_weight)) where d ≤ min_weight_distance, else 0 (untouched)"
)

# The kernel's four parameters, each an option per component (`--attention-max-weight`, ...):
# (parameter, what it is).
PARAMETERS = (
    ("max_weight", "the weight at the kernel's peak (heretic: 0.8 to 1.5; above 1 overshoots)"),
    ("max_weight_position", "the layer of the peak, fractional (default: the direction's layer)"),
    ("min_weight", "the weight at the kernel's edge, as a fraction of the peak's, in [0, 1]"),
    ("min_weight_distance", "layers from the peak to the edge; layers beyond it are untouched"),
)


@dataclass(frozen=True)
class LayerKernel:
    """One component's kernel, each parameter at its default where not given."""

    max_weight: float = 1.0
    max_weight_position: float = 0.0
    min_weight: float = 1.0
    min_weight_distance: float = math.inf

    def weight(self, layer: int) -> float:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        if self.min_weight_distance == 0 or math.isinf(self.min_weight_distance):
            return self.max_weight  # the peak's layer alone, or every layer alike
        return self.max_weight * (
            1.0 - (distance / self.min_weight_distance) * (1.0 - self.min_weight)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "max_weight": self.max_weight,
            "max_weight_position": self.max_weight_position,
            "min_weight": self.min_weight,
            "min_weight_distance": None
            if math.isinf(self.min_weight_distance)
            else self.min_weight_distance,
        }


def field_name(component: str, parameter: str) -> str:
    """The settings field of one component's parameter: `attention_max_weight`."""
    return f"{component}_{parameter}"


def flag(component: str, parameter: str) -> str:
    """Its option: `--attention-max-weight`."""
    return "--" + field_name(component, parameter).replace("_", "-")


def kernels(settings: Any, peak: float) -> dict[str, LayerKernel]:
    """The kernel of each component whose options were given (others are not shaped), from a
    settings object with the fields `field_name` names; `peak` is where a kernel peaks when its
    position is not given (the direction's layer)."""
    found: dict[str, LayerKernel] = {}
    for component in COMPONENTS:
        values = {p: getattr(settings, field_name(component, p)) for p, _ in PARAMETERS}
        given = {p: v for p, v in values.items() if v is not None}
        if given:
            given.setdefault("max_weight_position", float(peak))
            found[component] = LayerKernel(**{k: float(v) for k, v in given.items()})
    return found


def writer_weights(
    keys: list[str], components: dict[str, str], shaped: dict[str, LayerKernel]
) -> dict[str, float]:
    """Per writer key (`<layer>/<name>`), its weight: its component's kernel at its layer (1
    where the component is not shaped)."""
    weights: dict[str, float] = {}
    for key in keys:
        kernel = shaped.get(components[key])
        weights[key] = kernel.weight(int(key.split("/", 1)[0])) if kernel is not None else 1.0
    return weights
