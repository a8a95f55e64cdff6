"""N:M structured pruning: in every group of M consecutive inputs of a row, the N lowest (or
highest) scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wandacli.config.declare import option
from wandacli.config.settings import parse_nm
from wandacli.core.errors import ConfigError
from wandacli.core.naming import file_safe_name
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import MaskKind, Sets, name_suffix, open_score_sets
from wandacli.removal.masks import nm_mask
from wandacli.store.schema import split_key


@dataclass(frozen=True)
class NmSettings:
    sparsity_type: str = option(
        "unstructured",
        "--sparsity-type",
        metavar="<unstructured|N:M>",
        help="unstructured, or N:M (2:4, 4:8, ...): N of every M consecutive inputs.",
    )
    # N:M prunes N/M of the weights; a ratio given beside it must say the same.
    sparsity_ratio: float | None = options.sparsity_ratio()
    prune_highest: bool = options.prune_highest()

    @property
    def nm(self) -> tuple[int, int]:
        found = parse_nm(self.sparsity_type)
        assert found is not None
        return found


class NM(MaskKind):
    name = "n:m"
    title = "N:M pruning"
    selector = "--sparsity-type"
    alongside = "to N:M pruning (--sparsity-type N:M)"
    does = "prunes N of every M inputs"
    settings = NmSettings

    def claims(self, given: dict[str, Any]) -> bool:
        return "sparsity_type" in given

    def check(self, settings: NmSettings, request: Any) -> None:
        try:
            n, m = settings.nm
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if settings.sparsity_ratio is not None and abs(settings.sparsity_ratio - n / m) > 1e-9:
            raise ConfigError(
                f"--sparsity-type {n}:{m} prunes {n / m:g} of the weights; "
                f"--sparsity-ratio {settings.sparsity_ratio:g} contradicts it: drop it"
            )

    def effective_ratio(self, settings: NmSettings) -> float | None:
        n, m = settings.nm
        return n / m

    def open(self, request: Any, root: Path) -> Sets:
        sets = open_score_sets(request, root, None)
        m = request.settings.nm[1]
        for key in sets.keys:
            in_features = sets.fingerprint.shapes[key][1]
            if in_features % m:
                sets.close()
                layer, module = split_key(key)
                raise ConfigError(
                    f"N:M with M={m} needs in_features divisible by {m}: layer {layer} {module} "
                    f"has {in_features}"
                )
        return sets

    def default_name(self, request: Any, sets: Sets) -> str:
        n, m = request.settings.nm
        name = f"{sets.primary.name}.{n}of{m}"
        if request.settings.prune_highest:
            name += ".top"
        return file_safe_name(name + name_suffix(request))

    def mask(self, settings: NmSettings, sets: Sets, rankings: Any, key: str) -> np.ndarray:
        n, m = settings.nm
        return nm_mask(sets.primary.read(key), n, m, prune_highest=settings.prune_highest)

    def stored_meta(self, settings: NmSettings, sets: Sets) -> dict[str, Any]:
        return {
            "sparsity_ratio": self.effective_ratio(settings),
            "sparsity_type": settings.sparsity_type,
            "prune_highest": settings.prune_highest,
        }


KIND = NM()
