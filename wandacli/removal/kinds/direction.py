"""The refusal direction (Arditi et al. 2024): r from two mean-activations sets, removed from
every module that writes into the residual stream and from the token embedding
(removal/direction.py has the formula). Its control is a random unit vector removed the same
way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wandacli.config.declare import option
from wandacli.config.ranges import ParameterRange
from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.naming import file_safe_name
from wandacli.models.families import family_named
from wandacli.removal.content import EditContent, EditModule
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import EditKind, Searchable, Sets, closing_on_error, same_model
from wandacli.removal.ranks import random_orthonormal

RULE = (
    "r = normalise(mean_harmful[layer, position] − mean_harmless[layer, position]); writers "
    "W ← W − α r rᵀ W, token embedding E ← E − α (E r) rᵀ (α = direction_scale, 1: all of it; a "
    "tied output head changes with the embedding)"
)
PROJECTED_RULE = (
    "before its removal, r ← normalise(r − (r·μ̂) μ̂), μ̂ the harmless mean at the same layer "
    "and position normalised (heretic's projected direction)"
)
BIPROJECTED_RULE = (
    PROJECTED_RULE + "; then, per decoder layer i, its writers made orthogonal to "
    "normalise(r − (r·μ̂ᵢ) μ̂ᵢ), μ̂ᵢ the harmless mean of the stream they write, hidden_states"
    "[i + 1], at the same position (biprojected; stored per writer); the embedding loses r"
)
NORM_PRESERVING_RULE = (
    "after the edit, each writer column (the d_model-sized vector of one input feature) and "
    "each embedding row rescaled to its norm before the edit, computed exactly from the weights"
)
PROJECTIONS = {0: "none", 1: "projected", 2: "biprojected"}
CONTROL_RULE = (
    "a seeded random unit vector (Gaussian, normalised), removed from the writers and the "
    "embedding as the matched direction is"
)


def _share(value: float, flag: str) -> None:
    if not 0 < value <= 1:
        raise ConfigError(
            f"{flag} {value:g}: the share of the direction removed must lie in (0, 1] (1: all of it)"
        )


def _projection(value: int, flag: str) -> None:
    if value not in PROJECTIONS:
        raise ConfigError(
            f"{flag} {value}: use 0 (r as it is), 1 (orthogonal to the harmless mean at its "
            "layer) or 2 (biprojected: at each writer's layer too)"
        )


def _binary(value: int, flag: str) -> None:
    if value not in (0, 1):
        raise ConfigError(f"{flag} {value}: use 1 (on) or 0 (off)")


@dataclass(frozen=True)
class DirectionSettings:
    utility_scores: str | None = options.utility_scores()
    direction_layer: int | None = option(
        None,
        "--direction-layer",
        help="The refusal direction from two mean-activations sets (--scores HARMFUL "
        "--utility-scores HARMLESS): r = normalise(μ_harmful − μ_harmless) at this residual "
        "stream (hidden_states[L]), removed from every module writing into the stream "
        "(W ← W − r rᵀ W) and from the token embedding (E ← E − E r rᵀ).",
        panel=options.DIRECTION_PANEL,
    )
    direction_position: int = option(
        -1,
        "--direction-position",
        help="The direction's prompt position, from the end (-1: the last prompt token).",
        panel=options.DIRECTION_PANEL,
    )
    # heretic's "projected" direction: r made orthogonal to the harmless mean first, so that
    # removing it leaves the harmless prompts' mean stream as it was; biprojected, also
    # against each writer's own stream's harmless mean. Left out of the request at 0, as
    # every edit made before it existed.
    direction_projected: int = option(
        0,
        "--direction-projected",
        help="1: r orthogonalised against the harmless mean at its layer and position first, "
        "r ← normalise(r − (r·μ̂_harmless) μ̂_harmless) (heretic's default); 2: biprojected, "
        "each layer's writers also against the harmless mean of the stream they write; 0: "
        "Arditi et al.'s r [default].",
        panel=options.DIRECTION_PANEL,
        check=_projection,
        request_omits_default=True,
    )
    # Norm-preserving abliteration: the weights keep their magnitudes. Left out of the request
    # at 0, as every edit made before it existed.
    norm_preserving: int = option(
        0,
        "--norm-preserving",
        help="1: after the edit, each writer column and embedding row rescaled to its norm "
        "before it (exactly; the stream still carries no r); 0: not [default].",
        panel=options.DIRECTION_PANEL,
        check=_binary,
        request_omits_default=True,
    )
    # heretic's weight of the abliteration: W ← W − α r rᵀ W (1: orthogonalised; 0.5: the
    # stream keeps half its component along r from each writer). Left out of the request at
    # 1, as every edit made before the scale existed.
    direction_scale: float = option(
        1.0,
        "--direction-scale",
        help="The share α of the direction removed, in (0, 1]: W ← W − α r rᵀ W and "
        "E ← E − α E r rᵀ (heretic's abliteration weight; 1: all of it).",
        panel=options.DIRECTION_PANEL,
        check=_share,
        request_omits_default=True,
    )


def _binary_range(chosen: ParameterRange, flag: str) -> None:
    if not 0 <= chosen.low <= chosen.high <= 1:
        raise ConfigError(f"{flag} {chosen}: use 0, 1, or 0:1 to search both")


def _projection_range(chosen: ParameterRange, flag: str) -> None:
    if not 0 <= chosen.low <= chosen.high <= 2:
        raise ConfigError(f"{flag} {chosen}: use 0, 1, 2, or a range of them such as 0:2")


def _scale_range(chosen: ParameterRange, flag: str) -> None:
    if not 0 < chosen.low <= chosen.high <= 1:
        raise ConfigError(f"{flag} {chosen}: the share removed must lie in (0, 1] (1: all of it)")


def _position_range(chosen: ParameterRange, flag: str) -> None:
    if chosen.high > -1:
        raise ConfigError(
            f"{flag} {chosen}: positions count from the end, -1 the last prompt token (e.g. -5:-1)"
        )


def _layer_range(chosen: ParameterRange, flag: str) -> None:
    chosen.check_rank(flag)


class Direction(EditKind):
    name = "direction"
    title = "the refusal direction"
    selector = "--direction-layer"
    does = "removes one direction"
    settings = DirectionSettings
    modes = ("direction",)
    search_space = (
        Searchable("direction_layer", "--direction-layer", "The refusal direction (two mean-activations sets): its residual stream, e.g. 8:24.", integer=True, check=_layer_range),
        Searchable("direction_position", "--direction-position", "The refusal direction's prompt position from the end, e.g. -5:-1 [default: -1].", integer=True, check=_position_range, fixed=-1, ranged_when_fixed=True),
        Searchable("direction_scale", "--direction-scale", "The share of the refusal direction removed, e.g. 0.3:1 [default: 1, all of it].", linear=True, check=_scale_range, fixed=1.0),
        Searchable("direction_projected", "--direction-projected", "Whether r is orthogonalised against the harmless mean: 0, 1 (at its layer), 2 (biprojected), or a range such as 0:2 [default: 0].", integer=True, check=_projection_range, fixed=0),
        Searchable("norm_preserving", "--norm-preserving", "Whether the writers' columns keep their norms: 0, 1, or 0:1 to search both [default: 0].", integer=True, check=_binary_range, fixed=0),
    )  # fmt: skip
    search_groups = (frozenset({"direction_layer"}),)
    search_usage = (
        "--direction-layer (and --direction-position, --direction-scale) for the refusal direction"
    )

    def reference_method(self, meta: dict[str, Any]) -> str:
        return "random" if meta.get("matched_edit") else "refusal_direction"

    def claims(self, given: dict[str, Any]) -> bool:
        return "direction_layer" in given

    def check(self, settings: DirectionSettings, request: Any) -> None:
        if settings.utility_scores is None:
            raise ConfigError(
                "--direction-layer needs two mean-activations sets: --scores HARMFUL "
                "--utility-scores HARMLESS"
            )

    def open(self, request: Any, root: Path) -> Sets:
        from wandacli.removal.direction import writer_keys
        from wandacli.removal.selection import selected_keys
        from wandacli.store.files import open_mean_activations

        with closing_on_error() as stack:
            harmful = stack.enter_context(open_mean_activations(request.scores, root))
            second = request.settings.utility_scores
            harmless = stack.enter_context(open_mean_activations(second, root))
            same_model(
                harmful,
                harmless,
                "--scores",
                "--utility-scores",
                f"--scores {request.scores} and --utility-scores {second} were computed on "
                "different models",
            )
            for what, a, b in (
                ("models", harmful.meta["model"].get("id"), harmless.meta["model"].get("id")),
                ("templates", harmful.template, harmless.template),
                ("--positions", harmful.positions, harmless.positions),
            ):
                if a != b:
                    raise StoreError(
                        f"--scores {request.scores} and --utility-scores {second} were taken "
                        f"with different {what} ({a} and {b}): score both the same way"
                    )
            writers = set(writer_keys(harmful.fingerprint, harmful.hidden_size))
            keys = [k for k in selected_keys(request, harmful.fingerprint) if k in writers]
            if not keys:
                raise ConfigError(
                    "no module that writes into the residual stream is selected: drop "
                    "--layers/--modules, or choose writers (o_proj, down_proj, ...)"
                )
            sets = Sets(harmful, harmless, keys, root, stack)
            sets.extra["means"] = (harmful.means(), harmless.means())
            return sets

    def edited_weight(
        self, weight: torch.Tensor, bases: dict[str, torch.Tensor], scale: float = 1.0
    ) -> torch.Tensor:
        return remove_direction(weight, bases, scale)

    def control_of_stored(
        self, matched: Any, keys: list[str], shapes: dict[str, tuple[int, int]], seed: int
    ) -> EditContent:
        """A random unit vector as wide as the matched direction (its /direction)."""
        from wandacli.store.schema import DIRECTION_DATASET

        hidden = int(matched.read_raw(DIRECTION_DATASET).shape[0])
        generator = torch.Generator().manual_seed(seed)
        r = random_orthonormal(hidden, 1, generator).reshape(-1)
        # Removed from each writer as the matched edit did (as r alone where it predates the
        # per-writer record).
        writers = matched.meta.get("writers")
        treated = {k: writers[k] for k in keys if k in writers} if writers else None
        return removing(
            r,
            keys,
            shapes,
            self.stored_scale(matched.meta),
            treated,
            norm_preserving=self.stored_norm_preserving(matched.meta),
        )

    def control_meta(self, matched_meta: dict[str, Any]) -> dict[str, Any]:
        meta = {
            "embedding": True,
            "rule": CONTROL_RULE,
            "direction_scale": self.stored_scale(matched_meta),
        }
        if matched_meta.get("writers"):
            meta["writers"] = matched_meta["writers"]
        if self.stored_norm_preserving(matched_meta):
            meta["norm_preserving"] = NORM_PRESERVING_RULE
        return meta

    def stored_scale(self, meta: dict[str, Any]) -> float:
        """`--direction-scale` as the file records it (1 in files made before it existed)."""
        return float(meta.get("direction_scale", 1.0))

    def stored_norm_preserving(self, meta: dict[str, Any]) -> bool:
        """Whether a stored direction edit keeps the writers' norms (none did before the
        option existed)."""
        return bool(meta.get("norm_preserving"))

    def default_name(self, request: Any, sets: Sets) -> str:
        settings = request.settings
        assert sets.secondary is not None
        scale = f"a{settings.direction_scale:g}" if settings.direction_scale != 1.0 else ""
        projected = f"-{PROJECTIONS[settings.direction_projected]}"
        kept = "-norm-preserving" if settings.norm_preserving else ""
        return file_safe_name(
            f"{sets.primary.name}-minus-{sets.secondary.name}.direction-l"
            f"{settings.direction_layer}p{settings.direction_position}{scale}"
            f"{projected if settings.direction_projected else ''}{kept}"
        )

    def direction(self, settings: DirectionSettings, sets: Sets) -> torch.Tensor | None:
        """r̂ from the two means (float64), orthogonalised against the harmless mean with
        --direction-projected 1 or 2; None where the means are equal there (the embeddings'
        output at the template's own tokens is the same for every prompt): nothing to
        remove."""
        from wandacli.removal.direction import projected_direction, refusal_direction

        harmful, harmless = sets.extra["means"]
        layer, position = settings.direction_layer, settings.direction_position
        assert layer is not None
        if 0 <= layer < harmful.shape[0] and -harmful.shape[1] <= position <= -1:
            index = harmful.shape[1] + position
            if not np.any(harmful[layer, index] != harmless[layer, index]):
                return None
        r = refusal_direction(harmful, harmless, layer, position)
        if settings.direction_projected:
            return projected_direction(r, harmless[layer, harmful.shape[1] + position])
        return r

    def content(
        self, settings: DirectionSettings, sets: Sets, loaded: Any, reporter: Any
    ) -> EditContent:
        r = self.direction(settings, sets)
        if r is None:
            if settings.direction_layer == 0:
                raise ConfigError(
                    f"--direction-layer 0 is the embeddings' output: at position "
                    f"{settings.direction_position} every prompt has the template's same token, "
                    "so the two means are equal there: choose a layer of 1 or more"
                )
            raise StoreError(
                f"the two sets' means are equal at layer {settings.direction_layer}, position "
                f"{settings.direction_position}: no direction (were both scored on the same "
                "prompts?)"
            )
        return self._removing(r, settings, sets)

    def trial_content(
        self, settings: DirectionSettings, sets: Sets, prepared: Any
    ) -> EditContent | None:
        r = self.direction(settings, sets)
        if r is None:
            return None  # the dense model, measured as such
        return self._removing(r, settings, sets)

    def _removing(self, r: torch.Tensor, settings: DirectionSettings, sets: Sets) -> EditContent:
        """r (or, biprojected, each layer's own) removed from the selected writers as the
        settings say."""
        per_layer = None
        if settings.direction_projected == 2:
            from wandacli.removal.direction import biprojected_directions

            harmless = sets.extra["means"][1]
            index = harmless.shape[1] + settings.direction_position
            layers = {int(key.split("/", 1)[0]) for key in sets.keys}
            per_layer = biprojected_directions(r, harmless[:, index], layers)
        return removing(
            r,
            sets.keys,
            sets.fingerprint.shapes,
            settings.direction_scale,
            treatments(sets.keys, sets.fingerprint.family),
            norm_preserving=bool(settings.norm_preserving),
            per_layer=per_layer,
        )

    def stored_meta(self, settings: DirectionSettings, sets: Sets) -> dict[str, Any]:
        return {
            "embedding": True,
            "direction": {
                "layer": settings.direction_layer,
                "position": settings.direction_position,
                "rule": RULE,
                **(
                {"projected": (PROJECTED_RULE, BIPROJECTED_RULE)[settings.direction_projected - 1]}
                if settings.direction_projected
                else {}
            ),
            },
            "direction_scale": settings.direction_scale,
            **({"norm_preserving": NORM_PRESERVING_RULE} if settings.norm_preserving else {}),
            "family": family_named(sets.fingerprint.family).name,
            "writers": treatments(sets.keys, sets.fingerprint.family),
            "mean_activations": [
                _describe_means(sets.primary, "harmful"),
                _describe_means(sets.secondary, "harmless"),
            ],
        }

    def check_ranges(self, ranges: dict[str, ParameterRange], sets: Sets) -> None:
        """The ranges within the sets' streams and positions."""
        streams, positions = sets.fingerprint.num_layers + 1, sets.primary.positions
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

    def control(
        self,
        removed: dict[str, int],
        shapes: dict[str, tuple[int, int]],
        seed: int,
        *,
        scale: float = 1.0,
        hidden: int = 0,
        family: str | None = None,
        norm_preserving: bool = False,
    ) -> EditContent:
        """A seeded random unit vector removed the same way: every writer, the embedding, the
        same share, norms kept where the matched edit kept them."""
        generator = torch.Generator().manual_seed(seed)
        r = random_orthonormal(hidden, 1, generator).reshape(-1)
        keys = list(removed)
        return removing(
            r, keys, shapes, scale, treatments(keys, family), norm_preserving=norm_preserving
        )


def treatments(keys: list[str], family: str | None) -> dict[str, dict[str, Any]]:
    """Per writer, what removing a direction does to it, as the model's family declares."""
    declared = family_named(family)
    return {key: declared.writer_treatment(key.split("/", 1)[1]) for key in keys}


def removing(
    r: torch.Tensor,
    keys: list[str],
    shapes: dict[str, tuple[int, int]],
    scale: float,
    writers: dict[str, dict[str, Any]] | None,
    *,
    norm_preserving: bool = False,
    per_layer: dict[int, torch.Tensor] | None = None,
) -> EditContent:
    """r removed from every writer in `keys` (as `writers` says: orthogonal to r or to the
    normed direction, its bias too) and from the embedding, r rounded to float32 as the file
    stores it (once, at /direction; every writer's `remove` basis is it, or, with `per_layer`
    (biprojected), its layer's own direction, stored per writer)."""
    stored = r.float().reshape(-1, 1).numpy()
    own = {i: d.float().reshape(-1, 1).numpy() for i, d in (per_layer or {}).items()}
    modules = [
        EditModule(
            key,
            {"remove": own.get(int(key.split("/", 1)[0]), stored)},
            removed_rank=1,
            full_rank=min(shapes[key]),
            ranks={"remove": 1},
        )
        for key in keys
    ]
    return EditContent(
        "direction",
        modules,
        remove_direction,
        direction=stored,
        scale=scale,
        writers=writers,
        norm_preserving=norm_preserving,
    )


def remove_direction(
    weight: torch.Tensor, bases: dict[str, torch.Tensor], scale: float = 1.0
) -> torch.Tensor:
    """W − α r rᵀ W, r made unit length again in float64 (it is stored float32)."""
    from wandacli.removal.ranks import in_float64, project

    w, as64 = in_float64(weight, bases)
    r = as64["remove"] / as64["remove"].norm()
    return w - scale * project(r, w)


def _describe_means(means: Any, role: str) -> dict[str, Any]:
    return {
        "role": role,
        "name": means.name,
        "path": str(means.path),
        "data": (means.meta.get("data") or {}).get("name"),
        "template": means.template,
        "positions": means.positions,
        "finished": means.meta.get("finished"),
    }


KIND = Direction()
