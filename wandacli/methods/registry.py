"""The score methods by name."""

from __future__ import annotations

from wandacli.methods.actsvd import ActSvdMethod
from wandacli.methods.base import RunContext, ScoreMethod
from wandacli.methods.magnitude import MagnitudeMethod
from wandacli.methods.mean_activations import MeanActivationsMethod
from wandacli.methods.random import RandomMethod
from wandacli.methods.wanda import WandaMethod
from wandacli.methods.wandg import WandgMethod

METHOD_CLASSES: dict[str, type[ScoreMethod]] = {
    cls.name: cls
    for cls in (
        WandaMethod,
        WandgMethod,
        MagnitudeMethod,
        RandomMethod,
        ActSvdMethod,
        MeanActivationsMethod,
    )
}


def score_method(run: RunContext) -> ScoreMethod:
    return METHOD_CLASSES[run.config.method](run)
