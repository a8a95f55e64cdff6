"""The orthogonal projection (the reference's ActSVD with safety and utility data): the safety
ranks outside the utility subspace removed, W ← W − (I − Π_u) Π_s W, with the ranks given as
r_s and r_u, or as the reference's rank_neg/rank_pos (r = min(d_out, d_in) − rank per module).

`prune` stores V_s and V_u per module (the file's bases); a search's trial computes the same
ΔW from each module's eigenbases decomposed once (removal/projection.py: the cost of the
removed ranks rather than the kept ones), within about 1e-6 of the weights' scale of the
stored edit applied: the one kind whose trials take a faster road to the same formula.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from wandacli.config.ranges import ParameterRange
from wandacli.core.errors import ConfigError
from wandacli.core.naming import file_safe_name
from wandacli.removal.content import EditContent, EditModule
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import Searchable, Sets, name_suffix
from wandacli.removal.kinds.rank_base import RankEditKind
from wandacli.store.schema import split_key


@dataclass(frozen=True)
class ProjectionSettings:
    utility_scores: str | None = options.utility_scores()
    safety_ranks: int | None = options.rank(
        "--safety-ranks",
        "Orthogonal projection (with --utility-scores): r_s, the safety directions "
        "(--scores) removed where they leave the top r_u utility directions.",
    )
    utility_ranks: int | None = options.rank(
        "--utility-ranks", "Orthogonal projection: r_u, the utility directions kept."
    )
    rank_neg: int | None = options.rank(
        "--rank-neg",
        "The reference's parametrisation: r_s = min(d_out, d_in) − rank_neg per module.",
    )
    rank_pos: int | None = options.rank(
        "--rank-pos",
        "The reference's parametrisation: r_u = min(d_out, d_in) − rank_pos per module.",
    )
    sequential: bool = options.sequential()


def _rank_range(chosen: ParameterRange, flag: str) -> None:
    chosen.check_rank(flag)


DIRECT = ("safety_ranks", "utility_ranks")
REFERENCE = ("rank_neg", "rank_pos")


class Projection(RankEditKind):
    name = "orthogonal-projection"
    preparation = "every module's eigenbases"
    title = "the orthogonal projection"
    selector = "--safety-ranks/--utility-ranks or --rank-neg/--rank-pos"
    settings = ProjectionSettings
    modes = ("orthogonal-projection",)
    search_space = (
        Searchable("safety_ranks", "--safety-ranks", "Orthogonal projection: r_s, the safety ranks.", integer=True, check=_rank_range),
        Searchable("utility_ranks", "--utility-ranks", "Orthogonal projection: r_u, the utility ranks.", integer=True, check=_rank_range),
        Searchable("rank_neg", "--rank-neg", "The reference's rank_neg per module: r_s = full rank − rank_neg.", integer=True, check=_rank_range),
        Searchable("rank_pos", "--rank-pos", "The reference's rank_pos per module: r_u = full rank − rank_pos.", integer=True, check=_rank_range),
    )  # fmt: skip
    search_groups = (frozenset(DIRECT), frozenset(REFERENCE))
    search_usage = (
        "--safety-ranks and --utility-ranks (or --rank-neg and --rank-pos) for the orthogonal "
        "projection"
    )

    def reference_method(self, meta: dict[str, Any]) -> str:
        return "actsvd_orthogonal_projection"

    def claims(self, given: dict[str, Any]) -> bool:
        return bool({*DIRECT, *REFERENCE} & set(given))

    def secondary(self, settings: ProjectionSettings) -> str | None:
        return settings.utility_scores

    def check(self, settings: ProjectionSettings, request: Any) -> None:
        direct = settings.safety_ranks is not None or settings.utility_ranks is not None
        reference = settings.rank_neg is not None or settings.rank_pos is not None
        if settings.utility_scores is None:
            raise ConfigError(
                "--safety-ranks/--utility-ranks and --rank-neg/--rank-pos need --utility-scores "
                "(the orthogonal projection)"
            )
        if direct and reference:
            raise ConfigError(
                "give the projection's ranks once: --safety-ranks/--utility-ranks, or the "
                "reference's --rank-neg/--rank-pos, not both"
            )
        if direct and (settings.safety_ranks is None or settings.utility_ranks is None):
            raise ConfigError(
                "the orthogonal projection needs both --safety-ranks and --utility-ranks"
            )
        if reference and (settings.rank_pos is None or settings.rank_neg is None):
            raise ConfigError("the orthogonal projection needs both --rank-neg and --rank-pos")
        super().check(settings, request)

    def ranks_for(self, settings: ProjectionSettings, shape: tuple[int, int]) -> dict[str, int]:
        if settings.safety_ranks is not None and settings.utility_ranks is not None:
            return {"safety": settings.safety_ranks, "utility": settings.utility_ranks}
        assert settings.rank_neg is not None and settings.rank_pos is not None
        full = min(shape)
        return {"safety": full - settings.rank_neg, "utility": full - settings.rank_pos}

    def flag_for(self, settings: ProjectionSettings, role: str) -> str:
        if settings.safety_ranks is not None:
            return {"safety": "--safety-ranks", "utility": "--utility-ranks"}[role]
        return {"safety": "--rank-neg", "utility": "--rank-pos"}[role]

    def edited_weight(
        self, weight: torch.Tensor, bases: dict[str, torch.Tensor], scale: float = 1.0
    ) -> torch.Tensor:
        """W − (I − Π_u) Π_s W."""
        from wandacli.removal.ranks import in_float64, orthogonal_projection_delta

        w, as64 = in_float64(weight, bases)
        return w - orthogonal_projection_delta(w, as64["safety"], as64["utility"])

    def removed_rank(self, ranks: dict[str, int], full: int, bases: dict[str, torch.Tensor]) -> int:
        """The rank of (I − Π_u) V_s: the directions ΔW can change."""
        from wandacli.removal.ranks import removed_directions

        v_s, v_u = bases["safety"], bases["utility"]
        return removed_directions(v_s - v_u @ (v_u.T @ v_s))

    def default_name(self, request: Any, sets: Sets) -> str:
        settings = request.settings
        assert sets.secondary is not None
        prefix = f"{sets.primary.name}-minus-{sets.secondary.name}"
        if settings.safety_ranks is not None:
            name = f"{prefix}.rs{settings.safety_ranks}.ru{settings.utility_ranks}"
        else:
            name = f"{prefix}.neg{settings.rank_neg}.pos{settings.rank_pos}"
        name += name_suffix(request)
        if settings.sequential:
            name += ".seq"
        return file_safe_name(name)

    # -- a search's trials --------------------------------------------------------------

    def check_ranges(
        self, ranges: dict[str, ParameterRange], sets: Sets, model: Any = None
    ) -> None:
        """A rank range must fit every module it edits: one line naming the first that not."""
        shapes = sets.fingerprint.shapes
        for key in sets.keys:
            full = min(shapes[key])
            for parameter in self.search_space:
                chosen = ranges.get(parameter.name)
                if chosen is not None and chosen.high > full:
                    layer, module = split_key(key)
                    raise ConfigError(
                        f"{parameter.flag} {chosen} reaches above layer {layer} {module}'s rank "
                        f"of {full} (its weight is {shapes[key][0]}×{shapes[key][1]}): lower "
                        "the range's upper end, or choose modules with --modules"
                    )

    def prepare_trials(self, sets: Sets, loaded: Any, reporter: Any) -> dict[str, Any]:
        """Every module's eigenbases and the weight's coordinates in them, once."""
        from wandacli.removal.projection import ProjectionModule

        assert sets.secondary is not None
        layers = {lin.key: lin for lin in loaded.linear_layers}
        prepared = {}
        for key in sets.keys:
            weight = layers[key].weight_matrix().detach()
            prepared[key] = ProjectionModule(
                weight,
                torch.from_numpy(sets.primary.read(key)).to(weight.device),
                torch.from_numpy(sets.secondary.read(key)).to(weight.device),
            )
            reporter.advance(2)
        return prepared

    def trial_content(
        self, settings: ProjectionSettings, sets: Sets, prepared: dict[str, Any]
    ) -> EditContent:
        """ΔW module by module as the trial applies it (each freed before the next is
        computed: all of them at once would be the model's size again)."""

        def modules() -> Iterator[EditModule]:
            for key, module in prepared.items():
                ranks = self.ranks_for(settings, sets.fingerprint.shapes[key])
                safety_rank, utility_rank = ranks["safety"], ranks["utility"]
                yield EditModule(
                    key,
                    delta=module.delta(safety_rank, utility_rank),
                    removed_rank=module.removed_rank(safety_rank, utility_rank),
                    full_rank=module.full,
                    ranks=ranks,
                )

        return EditContent(self.name, modules(), self.edited_weight)


KIND = Projection()
