"""A trial's removal, built in memory from the stored sets and applied to the loaded model.

Everything a trial needs that does not depend on its parameters is prepared once: each
matrix's scores ranked up to the range's upper end (`removal.presorted`), or each module's
eigenbases (`removal.projection`). A trial is then slices and comparisons for a mask, and
products with the removed ranks for an edit. The masks have the bits `prune` writes for the
same parameters; the edits' weights agree with `prune`'s within float32 rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wandacli.config.removal import EditConfig, PruneConfig
from wandacli.config.search import SearchConfig
from wandacli.core.console import Reporter
from wandacli.core.errors import ConfigError, StoreError
from wandacli.removal.direction import orthogonalised_embedding, refusal_direction, writer_keys
from wandacli.removal.in_memory import WeightChanges
from wandacli.removal.presorted import PresortedScores, set_difference
from wandacli.removal.projection import ProjectionModule
from wandacli.removal.ranks import edited_weight, random_orthonormal
from wandacli.removal.requests import selected_keys
from wandacli.store.files import open_mean_activations, open_rank_statistics, open_score_set
from wandacli.store.schema import split_key


@dataclass
class Applied:
    """What a trial's removal changed: per module, the entries pruned (masks) or the rank
    removed (edits), and the share of all it amounts to."""

    counts: dict[str, int]
    amount: float  # sparsity over every decoder linear weight, or the removed rank's share
    amount_name: str  # "sparsity" or "removed_rank_fraction"
    direction_scale: float = 1.0  # the share of a direction removed (its control's too)


def prune_config_for(
    config: SearchConfig, params: dict[str, Any], name: str
) -> PruneConfig | EditConfig:
    """The `prune` request that makes the same removal as a trial with `params`."""
    common: dict[str, Any] = {
        "scores": config.scores,
        "store": config.store,
        "layers": config.layers,
        "modules": config.modules,
        "name": name,
    }
    if config.kind == "direction":
        return EditConfig(
            **common,
            model=config.model,
            utility_scores=config.utility_scores,
            direction_layer=int(params["direction_layer"]),
            direction_position=int(params.get("direction_position", -1)),
            direction_scale=float(params.get("direction_scale", 1.0)),
        )
    if config.kind == "orthogonal-projection":
        return EditConfig(
            **common,
            model=config.model,
            utility_scores=config.utility_scores,
            **{k: int(v) for k, v in params.items()},  # type: ignore[arg-type]
        )
    if config.kind == "top":
        return PruneConfig(
            **common, sparsity_ratio=float(params["sparsity_ratio"]), prune_highest=True
        )
    return PruneConfig(
        **common,
        utility_scores=config.utility_scores,
        p=float(params["p"]),
        q=float(params["q"]),
    )


class TrialRemovals:
    """The search's removal, prepared once from the store, applied per trial."""

    def __init__(self, config: SearchConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self._stack = contextlib.ExitStack()
        opener: Any = {
            "direction": open_mean_activations,
            "orthogonal-projection": open_rank_statistics,
        }.get(config.kind, open_score_set)
        try:
            self.safety = self._stack.enter_context(opener(config.scores, root))
            self.utility = (
                self._stack.enter_context(opener(config.utility_scores, root))
                if config.utility_scores is not None
                else None
            )
        except BaseException:
            self._stack.close()
            raise
        try:
            self._check_sets()
        except BaseException:
            self.close()
            raise
        self._ranked: dict[str, PresortedScores] = {}
        self._modules: dict[str, ProjectionModule] = {}

    def _check_sets(self) -> None:
        """Both sets from one model; the modules chosen; every rank within its module."""
        config = self.config
        if self.utility is not None:
            mismatch = self.safety.fingerprint.first_mismatch(
                self.utility.fingerprint, mine="--scores", theirs="--utility-scores"
            )
            if mismatch:
                raise StoreError(
                    f"--scores {config.scores} and --utility-scores {config.utility_scores} "
                    f"come from different models: {mismatch}"
                )
        self.fingerprint = self.safety.fingerprint
        self.keys = selected_keys(config, self.fingerprint)
        self.total = sum(o * i for o, i in self.fingerprint.shapes.values())
        self._check_ranks()
        if config.kind == "direction":
            self._check_direction()

    def _check_direction(self) -> None:
        """The ranges within the sets' streams and positions; the writers chosen; the two sets
        of one kind (as `prune` requires)."""
        assert self.utility is not None
        writers = set(writer_keys(self.fingerprint, self.safety.hidden_size))
        self.keys = [k for k in self.keys if k in writers]
        if not self.keys:
            raise ConfigError(
                "no module that writes into the residual stream is selected: drop "
                "--layers/--modules, or choose writers (o_proj, down_proj, ...)"
            )
        ranges = self.config.ranges()
        streams, positions = self.fingerprint.num_layers + 1, self.safety.positions
        if ranges["direction_layer"].high > streams - 1:
            raise ConfigError(
                f"--direction-layer {ranges['direction_layer']} reaches above the sets' residual "
                f"streams 0..{streams - 1}"
            )
        if ranges["direction_position"].low < -positions:
            raise ConfigError(
                f"--direction-position {ranges['direction_position']} reaches before the sets' "
                f"last {positions} prompt positions: use -{positions}..-1"
            )
        for what, a, b in (
            ("models", self.safety.meta["model"].get("id"), self.utility.meta["model"].get("id")),
            ("templates", self.safety.template, self.utility.template),
            ("--positions", self.safety.positions, self.utility.positions),
        ):
            if a != b:
                raise StoreError(
                    f"--scores and --utility-scores were taken with different {what} ({a} and "
                    f"{b}): score both the same way"
                )
        self.means = (self.safety.means(), self.utility.means())

    def _check_ranks(self) -> None:
        """A rank range must fit every module it edits: one line naming the first that not."""
        if not self.config.is_edit:
            return
        for key in self.keys:
            full = min(self.fingerprint.shapes[key])
            for flag, name in (
                ("--safety-ranks", "safety_ranks"),
                ("--utility-ranks", "utility_ranks"),
                ("--rank-neg", "rank_neg"),
                ("--rank-pos", "rank_pos"),
            ):
                chosen = self.config.ranges().get(name)
                if chosen is not None and chosen.high > full:
                    layer, module = split_key(key)
                    raise ConfigError(
                        f"{flag} {chosen} reaches above layer {layer} {module}'s rank of {full} "
                        f"(its weight is {self.fingerprint.shapes[key][0]}×{self.fingerprint.shapes[key][1]}): "
                        "lower the range's upper end, or choose modules with --modules"
                    )

    def close(self) -> None:
        self._stack.close()

    # -- preparation ---------------------------------------------------------------------

    def prepare(self, loaded: Any, reporter: Reporter) -> None:
        """Rank the scores (masks) or decompose every module (edits), once."""
        self.safety.check_model(loaded.fingerprint, loaded.model_id)
        reporter.start(
            "search: ranking the stored sets", total=len(self.keys) * (2 if self.utility else 1)
        )
        config = self.config
        if config.kind == "direction":
            reporter.finish()
            return
        if config.kind == "set-difference":
            assert config.p is not None and config.q is not None and self.utility is not None
            self._ranked["safety"] = PresortedScores(
                self.keys,
                self.safety.read,
                config.q.high,
                per_row=False,
                on_matrix=reporter.advance,
            )
            self._ranked["utility"] = PresortedScores(
                self.keys,
                self.utility.read,
                config.p.high,
                per_row=False,
                on_matrix=reporter.advance,
            )
        elif config.kind == "top":
            assert config.ratio is not None
            self._ranked["safety"] = PresortedScores(
                self.keys,
                self.safety.read,
                config.ratio.high,
                per_row=True,
                on_matrix=reporter.advance,
            )
        else:
            assert self.utility is not None
            layers = {lin.key: lin for lin in loaded.linear_layers}
            for key in self.keys:
                weight = layers[key].weight_matrix().detach()
                self._modules[key] = ProjectionModule(
                    weight,
                    torch.from_numpy(self.safety.read(key)).to(weight.device),
                    torch.from_numpy(self.utility.read(key)).to(weight.device),
                )
                reporter.advance(2)
        reporter.finish()

    # -- a trial -------------------------------------------------------------------------

    def mask(self, key: str, params: dict[str, Any]) -> np.ndarray:
        """The trial's mask of one matrix (True = pruned)."""
        if self.config.kind == "top":
            return self._ranked["safety"].top(key, float(params["sparsity_ratio"]))
        return set_difference(
            self._ranked["safety"].matrices[key],
            self._ranked["utility"].matrices[key],
            float(params["p"]),
            float(params["q"]),
        )

    def ranks(self, key: str, params: dict[str, Any]) -> tuple[int, int]:
        """(r_s, r_u) of one module, as EditConfig.ranks_for gives them."""
        full = min(self.fingerprint.shapes[key])
        if "safety_ranks" in params:
            return int(params["safety_ranks"]), int(params["utility_ranks"])
        return full - int(params["rank_neg"]), full - int(params["rank_pos"])

    def direction(self, params: dict[str, Any]) -> torch.Tensor | None:
        """The trial's r̂ from the two stored means; None where they are equal (the embeddings'
        output at the template's own tokens is the same for every prompt): nothing to remove."""
        harmful, harmless = self.means
        layer, position = int(params["direction_layer"]), int(params.get("direction_position", -1))
        index = harmful.shape[1] + position
        if not np.any(harmful[layer, index] != harmless[layer, index]):
            return None
        return refusal_direction(harmful, harmless, layer, position)

    def _remove_direction(self, r: torch.Tensor, changes: WeightChanges, scale: float) -> Applied:
        """W ← W − α r rᵀ W for every writer, E ← E − α (E r) rᵀ: what `prune` writes and
        EditRemoval applies, in float64, rounded to the weights' dtype."""
        for key in self.keys:
            original = changes.layers[key].weight_matrix().detach()
            edited = edited_weight(original, "direction", {"remove": r.reshape(-1, 1)}, scale=scale)
            changes.replace(key, edited)
        changes.replace_embedding(orthogonalised_embedding(changes.embedding, r, scale))
        counts = dict.fromkeys(self.keys, 1)
        full = sum(min(shape) for shape in self.fingerprint.shapes.values())
        return Applied(counts, len(self.keys) / full, "removed_rank_fraction", scale)

    def apply(self, params: dict[str, Any], changes: WeightChanges) -> Applied:
        counts: dict[str, int] = {}
        if self.config.kind == "direction":
            r = self.direction(params)
            if r is None:  # the dense model, measured as such
                return Applied({}, 0.0, "removed_rank_fraction")
            return self._remove_direction(r, changes, float(params.get("direction_scale", 1.0)))
        if not self.config.is_edit:
            for key in self.keys:
                counts[key] = changes.zero(key, self.mask(key, params))
            return Applied(counts, sum(counts.values()) / self.total, "sparsity")
        for key in self.keys:
            module = self._modules[key]
            safety_rank, utility_rank = self.ranks(key, params)
            original = changes.layers[key].weight_matrix().detach()
            delta = module.delta(safety_rank, utility_rank).to(original.device)
            changes.replace(key, original.float() - delta)
            counts[key] = module.removed_rank(safety_rank, utility_rank)
        full = sum(min(shape) for shape in self.fingerprint.shapes.values())
        return Applied(counts, sum(counts.values()) / full, "removed_rank_fraction")

    def apply_control(self, applied: Applied, changes: WeightChanges, seed: int) -> None:
        """A random control of the same size: per matrix, as many entries chosen uniformly at
        random (masks), or the same rank removed in random directions (edits)."""
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)
        if self.config.kind == "direction":  # a random unit vector, removed the same way
            r = random_orthonormal(self.safety.hidden_size, 1, generator).reshape(-1)
            self._remove_direction(r, changes, applied.direction_scale)
            return
        for key in self.keys:
            count = applied.counts.get(key, 0)
            shape = self.fingerprint.shapes[key]
            if not self.config.is_edit:
                chosen = rng.choice(shape[0] * shape[1], size=count, replace=False)
                mask = np.zeros(shape[0] * shape[1], dtype=bool)
                mask[chosen] = True
                changes.zero(key, mask.reshape(shape))
            else:
                original = changes.layers[key].weight_matrix().detach()
                delta = self._modules[key].random_delta(count, generator, original)
                changes.replace(key, original.float() - delta.to(original.device))
