"""A trial's removal: the search's kind builds it from the stored sets, as `prune` builds it,
and it is applied to the loaded model through the functions evaluation applies a stored
removal with (removal/content.py), then undone.

What a trial needs that does not depend on its parameters is prepared once: each matrix's
scores ranked up to the range's upper end (mask kinds), each module's eigenbases (the
orthogonal projection), the two means (the refusal direction). A trial is then slices and
comparisons for a mask, products with the removed ranks for an edit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wandacli.core.console import NullReporter, Reporter
from wandacli.removal.content import (
    EditContent,
    EditShape,
    MaskContent,
    apply_edit,
    apply_mask,
    removed_rank_fraction,
)
from wandacli.removal.in_memory import WeightChanges
from wandacli.removal.kinds.base import EditKind, MaskKind
from wandacli.removal.request import RemovalRequest, check_request
from wandacli.search.config import SearchConfig


@dataclass
class Applied:
    """What a trial's removal changed: per module, the entries pruned (masks) or the rank
    removed (edits), and the share of all it amounts to."""

    counts: dict[str, int]
    amount: float  # sparsity over every decoder linear weight, or the removed rank's share
    amount_name: str  # "sparsity" or "removed_rank_fraction"
    shape: EditShape = EditShape()  # how the edit was applied (its control is applied so)


def amount_name(config: SearchConfig) -> str:
    return "removed_rank_fraction" if config.is_edit else "sparsity"


def prune_config_for(config: SearchConfig, params: dict[str, Any], name: str) -> RemovalRequest:
    """The `prune` request that makes the same removal as a trial with `params`."""
    kind = config.removal_kind
    settings = kind.settings(**_settings_values(config, params))
    request = RemovalRequest(
        scores=config.scores,
        store=config.store,
        layers=config.layers,
        modules=config.modules,
        include_routers=config.include_routers,
        name=name,
        model=config.model.keeping_checkpoint_dtype(),
        kind=kind.name,
        settings=settings,
    )
    check_request(request)
    return request


def _settings_values(config: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """A kind's settings at a trial's parameters: the search's second set, what the search
    fixes for the kind, the parameters (and the fixed values of those not searched)."""
    kind = config.removal_kind
    names = {f.name for f in dataclasses.fields(kind.settings)}
    values: dict[str, Any] = {}
    if "utility_scores" in names:
        values["utility_scores"] = config.utility_scores
    values.update(getattr(kind, "search_fixed", {}))
    values.update(kind.search_settings(params))
    return values


class TrialRemovals:
    """The search's removal, prepared once from the store, applied per trial."""

    def __init__(self, config: SearchConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self.kind = config.removal_kind
        template = RemovalRequest(
            scores=config.scores,
            store=config.store,
            layers=config.layers,
            modules=config.modules,
            include_routers=config.include_routers,
            kind=self.kind.name,
            settings=self.kind.settings(**_settings_values(config, {})),
        )
        self.sets = self.kind.open(template, root)
        try:
            self.kind.check_ranges(config.searched(), self.sets, config.model)
        except BaseException:
            self.close()
            raise
        self.keys = self.sets.keys
        self.fingerprint = self.sets.fingerprint
        self.total = sum(o * i for o, i in self.fingerprint.shapes.values())
        self._prepared: Any = None

    @property
    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """The two mean-activations sets' means (the refusal direction)."""
        return self.sets.extra["means"]

    def may_leave_lower_layers(self) -> bool:
        """Whether some trial may leave the embedding and layer 0 as they are (the kind says)."""
        return self.kind.may_leave_lower_layers(self.config.searched(), self.keys)

    def close(self) -> None:
        self.sets.close()

    # -- preparation ---------------------------------------------------------------------

    def prepare(self, loaded: Any, reporter: Reporter) -> None:
        """Rank the scores (masks) or decompose every module (edits), once."""
        self.sets.primary.check_model(loaded.fingerprint, loaded.model_id)
        preparation = self.kind.preparation
        shown = reporter if preparation is not None else NullReporter()
        shown.start(
            f"search: {preparation}",
            total=len(self.keys) * (2 if self.sets.secondary is not None else 1),
        )
        if isinstance(self.kind, MaskKind):
            bounds = {name: chosen.high for name, chosen in self.config.searched().items()}
            self._prepared = self.kind.presorted_rankings(self.sets, bounds, shown.advance)
        else:
            self._prepared = self.kind.prepare_trials(self.sets, loaded, shown)
        shown.finish()

    # -- a trial -------------------------------------------------------------------------

    def settings(self, params: dict[str, Any]) -> Any:
        return self.kind.settings(**_settings_values(self.config, params))

    def mask(self, key: str, params: dict[str, Any]) -> np.ndarray:
        """The trial's mask of one matrix (True = pruned)."""
        assert isinstance(self.kind, MaskKind)
        return self.kind.mask(self.settings(params), self.sets, self._prepared, key)

    def direction(self, params: dict[str, Any]) -> torch.Tensor | None:
        """The trial's r̂ (a direction search); None where the two means are equal there."""
        from wandacli.removal.kinds.direction import Direction

        assert isinstance(self.kind, Direction)
        return self.kind.direction(self.settings(params), self.sets)

    def content(self, params: dict[str, Any]) -> MaskContent | EditContent | None:
        """The trial's removal (None: it removes nothing)."""
        settings = self.settings(params)
        if isinstance(self.kind, MaskKind):
            return self.kind.content(settings, self.sets, self._prepared)
        assert isinstance(self.kind, EditKind)
        return self.kind.trial_content(settings, self.sets, self._prepared)

    def apply(self, params: dict[str, Any], changes: WeightChanges) -> Applied:
        return self.apply_content(self.content(params), changes)

    def apply_content(
        self, content: MaskContent | EditContent | None, changes: WeightChanges
    ) -> Applied:
        if isinstance(content, MaskContent):
            pruned = apply_mask(content, changes)
            return Applied(pruned, sum(pruned.values()) / self.total, "sparsity")
        if content is None:  # the dense model, measured as such
            return Applied({}, 0.0, "removed_rank_fraction")
        counts: dict[str, int] = {}
        scales: dict[str, float] = {}
        for module in apply_edit(content, changes):  # streamed: a rank edit's bases are large
            counts[module.key] = module.removed_rank
            if module.scale is not None:
                scales[module.key] = module.scale
        fraction = removed_rank_fraction(counts, self.fingerprint.shapes)
        return Applied(counts, fraction, "removed_rank_fraction", content.shape(scales))

    def apply_control(self, applied: Applied, changes: WeightChanges, seed: int) -> None:
        """A random control of the same size: per matrix, as many entries chosen uniformly at
        random (masks); the same rank removed in random directions, or a random unit vector
        removed the same way (edits), as `prune --match-ranks` makes it."""
        shapes = self.fingerprint.shapes
        if isinstance(self.kind, MaskKind):
            from wandacli.removal.kinds.matched_counts import random_entries

            self.apply_content(random_entries(self.keys, shapes, applied.counts, seed), changes)
            return
        assert isinstance(self.kind, EditKind)
        removed = {key: applied.counts.get(key, 0) for key in self.keys}
        hidden = getattr(self.sets.primary, "hidden_size", 0)
        control = self.kind.control(
            removed,
            shapes,
            seed,
            shape=applied.shape,
            hidden=hidden,
            family=self.fingerprint.family,
        )
        self.apply_content(control, changes)
