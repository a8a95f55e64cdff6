"""The refusal direction (Arditi et al. 2024): r from two mean-activations sets, removed from
every module that writes into the residual stream and from the token embedding
(removal/direction.py has the formula). Its control is a random unit vector removed the same
way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wandacli.config.declare import at_least, option, or_more, within
from wandacli.config.ranges import ParameterRange
from wandacli.core.console import NullReporter
from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.naming import file_safe_name
from wandacli.models.families import family_named
from wandacli.removal import layer_weights
from wandacli.removal.content import EditContent, EditModule, EditShape
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
PER_LAYER_RULE = (
    "per decoder layer i, its writers made orthogonal to r_(i+1) = normalise(mean_harmful − "
    "mean_harmless) of the stream they write, hidden_states[i + 1], at the same position "
    "(projected against that stream's harmless mean where asked; stored per writer): heretic's "
    "per-layer direction scope; the embedding loses the source layer's r"
)
FRACTION_RULE = (
    "r ← normalise((1 − f) r_L + f r_(L+1)): the layer's and the next layer's directions (each "
    "projected as asked) interpolated (heretic's fractional direction index)"
)
DIRECTIONS_RULE = (
    "K directions: the top K right singular vectors of the harmful prompts' h_i − μ_harmless at "
    "the layer and position (uncentred), each signed to agree with r, orthonormal; writers "
    "W ← W − α R Rᵀ W, embedding E ← E − α (E R) Rᵀ; stored [d_model, K] at /direction"
)
ROW_NORM_PRESERVING_RULE = (
    "each writer row (the d_in-sized weights of one output coordinate) normalised before the "
    "edit, the edit applied to that matrix, its rows normalised again and scaled back to their "
    "norms before the edit (heretic's magnitude-preserving orthogonal ablation, computed "
    "exactly, not compressed to a low rank; the stream keeps a little of r); embedding rows "
    "rescaled to their norms"
)
NORM_PRESERVING_RULE = (
    "after the edit, each writer column (the d_model-sized vector of one input feature) and "
    "each embedding row rescaled to its norm before the edit, computed exactly from the weights"
)
# --norm-preserving's values and the rule each records in the meta (read back by the text).
NORM_RULE_TEXT = {1: NORM_PRESERVING_RULE, 2: ROW_NORM_PRESERVING_RULE}
NORM_RULES = {text: value for value, text in NORM_RULE_TEXT.items()}
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


def _norm_rule(value: int, flag: str) -> None:
    if value not in (0, 1, 2):
        raise ConfigError(f"{flag} {value}: use 0 (off), 1 (columns) or 2 (rows, heretic's)")


def _binary(value: int, flag: str) -> None:
    if value not in (0, 1):
        raise ConfigError(f"{flag} {value}: use 1 (on) or 0 (off)")


# The kernel's parameters within heretic's ranges and a little beyond (a peak up to 2; heretic
# searches 0.8-1.5); a fractional layer short of the next.
_fraction = within(0, 1, low_open=False, high_open=True)
_count = at_least(1)
KERNEL_CHECKS = {
    "max_weight": within(0, 2, low_open=True, high_open=False),
    "max_weight_position": or_more(0),
    "min_weight": within(0, 1, low_open=False, high_open=False),
    "min_weight_distance": or_more(0),
}


def _kernel_option(component: str, parameter: str) -> Any:
    """One component's kernel parameter as an option (layer_weights.py has the kernel); not
    given, the component is not shaped (or the parameter takes the kernel's default)."""
    what = dict(layer_weights.PARAMETERS)[parameter]
    return option(
        None,
        layer_weights.flag(component, parameter),
        help=f"Per-layer weights of the {component} writers: {what}.",
        panel=options.DIRECTION_PANEL,
        check=KERNEL_CHECKS[parameter],
    )


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
        "before it (exactly; the stream still carries no r); 2: heretic's rows, each writer row "
        "normalised, the edit applied, the rows scaled back to their norms (exactly; the "
        "stream keeps a little of r); 0: not [default].",
        panel=options.DIRECTION_PANEL,
        check=_norm_rule,
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
    # Several directions at once. Left out of the request at 1, as every edit before it.
    directions: int = option(
        1,
        "--directions",
        help="Remove K directions at once: the top K principal directions of the per-prompt "
        "differences h_i − μ_harmless at the layer and position, orthonormal (the first near "
        "r); needs the harmful set scored with --per-prompt [default: 1, r itself].",
        panel=options.DIRECTION_PANEL,
        check=_count,
        request_omits_default=True,
    )
    # heretic's fractional direction index: layer + fraction. Left out of the request at 0.
    direction_fraction: float = option(
        0.0,
        "--direction-fraction",
        help="A fractional direction layer: r ← normalise((1 − f) r_L + f r_(L+1)), the "
        "layer's and the next layer's directions interpolated (heretic's direction index "
        "L + f); in [0, 1) [default: 0].",
        panel=options.DIRECTION_PANEL,
        check=_fraction,
        request_omits_default=True,
    )
    # heretic's per-layer direction scope. Left out of the request at 0, as every edit before.
    direction_per_layer: int = option(
        0,
        "--direction-per-layer",
        help="1: each decoder layer's writers lose the direction of the stream they write, "
        "r_(i+1) at the position (projected against its own harmless mean with "
        "--direction-projected 1 or 2), not one r for all (heretic's per-layer scope); "
        "--direction-layer's r goes from the embedding; 0: one r [default].",
        panel=options.DIRECTION_PANEL,
        check=_binary,
        request_omits_default=True,
    )
    # heretic never edits the embedding; Arditi et al. do. Left out of the request at 1.
    direction_embedding: int = option(
        1,
        "--direction-embedding",
        help="1: the token embedding loses r too (Arditi et al.) [default]; 0: only the "
        "writers (heretic).",
        panel=options.DIRECTION_PANEL,
        check=_binary,
        request_omits_default=True,
    )
    # Refusal direction optimisation (Wollschläger et al. 2025). Left out of the request at 0.
    direction_optimise: int = option(
        0,
        "--direction-optimise",
        help="Refine r (or the --directions K span, a cone) by this many gradient steps of "
        "refusal direction optimisation (RDO): with it removed the harmful prompts keep the "
        "answers they give without r, added it still makes harmless prompts refuse, and the "
        "harmless prompts' next tokens move little (KL); trained once on the two sets' prompts "
        "and kept in the store [default: 0, r as it is].",
        panel=options.DIRECTION_PANEL,
        check=or_more(0),
        request_omits_default=True,
    )
    direction_retain_weight: float = option(
        1.0,
        "--direction-retain-weight",
        help="With --direction-optimise: the weight of the KL term against the ablation term "
        "(1) and the addition term (0.2); higher keeps harmless prompts closer [default: 1].",
        panel=options.DIRECTION_PANEL,
        check=or_more(0),
        request_omits_default=True,
    )
    attention_max_weight: float | None = _kernel_option("attention", "max_weight")
    attention_max_weight_position: float | None = _kernel_option("attention", "max_weight_position")
    attention_min_weight: float | None = _kernel_option("attention", "min_weight")
    attention_min_weight_distance: float | None = _kernel_option("attention", "min_weight_distance")
    mlp_max_weight: float | None = _kernel_option("mlp", "max_weight")
    mlp_max_weight_position: float | None = _kernel_option("mlp", "max_weight_position")
    mlp_min_weight: float | None = _kernel_option("mlp", "min_weight")
    mlp_min_weight_distance: float | None = _kernel_option("mlp", "min_weight_distance")


def _binary_range(chosen: ParameterRange, flag: str) -> None:
    if not 0 <= chosen.low <= chosen.high <= 1:
        raise ConfigError(f"{flag} {chosen}: use 0, 1, or 0:1 to search both")


def _projection_range(chosen: ParameterRange, flag: str) -> None:
    if not 0 <= chosen.low <= chosen.high <= 2:
        raise ConfigError(f"{flag} {chosen}: use 0, 1, 2, or a range of them such as 0:2")


def _scale_range(chosen: ParameterRange, flag: str) -> None:
    if not 0 < chosen.low <= chosen.high <= 1:
        raise ConfigError(f"{flag} {chosen}: the share removed must lie in (0, 1] (1: all of it)")


def _each_end(check: Any) -> Any:
    """A range's check from a value's: both ends must pass it."""

    def both(chosen: ParameterRange, flag: str) -> None:
        check(chosen.low, flag)
        check(chosen.high, flag)

    return both


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
        Searchable("norm_preserving", "--norm-preserving", "Whether the writers keep their norms: 0, 1 (columns), 2 (rows, heretic's), or a range such as 0:2 [default: 0].", integer=True, check=_projection_range, fixed=0),
        Searchable("directions", "--directions", "How many directions are removed at once, e.g. 1:4 [default: 1].", integer=True, check=_each_end(_count), fixed=1),
        Searchable("direction_fraction", "--direction-fraction", "The fractional part of the direction's layer, e.g. 0:0.99 (with --direction-layer, heretic's fractional index) [default: 0].", linear=True, check=_each_end(_fraction), fixed=0.0),
        Searchable("direction_per_layer", "--direction-per-layer", "Whether each layer's writers lose their own stream's direction: 0, 1, or 0:1 [default: 0].", integer=True, check=_binary_range, fixed=0),
        Searchable("direction_optimise", "--direction-optimise", "Steps of refusal direction optimisation, one value (trained once per direction the trials ask for, kept in the store) [default: 0].", integer=True, check=_each_end(or_more(0)), fixed=0),
        Searchable("direction_retain_weight", "--direction-retain-weight", "With --direction-optimise: the KL term's weight, one value [default: 1].", linear=True, check=_each_end(or_more(0)), fixed=1.0),
        Searchable("direction_embedding", "--direction-embedding", "Whether the embedding loses r too: 0, 1, or 0:1 [default: 1].", integer=True, check=_binary_range, fixed=1),
        *(
            Searchable(
                layer_weights.field_name(component, parameter),
                layer_weights.flag(component, parameter),
                f"Per-layer weights of the {component} writers: {what}, e.g. {example}.",
                linear=True,
                check=_each_end(KERNEL_CHECKS[parameter]),
                optional=True,
            )
            for component in layer_weights.COMPONENTS
            for (parameter, what), example in zip(
                layer_weights.PARAMETERS, ("0.8:1.5", "14:23", "0:1", "1:14"), strict=True
            )
        ),
    )  # fmt: skip
    search_groups = (frozenset({"direction_layer"}),)
    search_usage = (
        "--direction-layer (and the direction's other ranges: --direction-position, "
        "--direction-scale, ...) for the refusal direction"
    )

    def reference_method(self, meta: dict[str, Any]) -> str:
        return "random" if meta.get("matched_edit") else "refusal_direction"

    def claims(self, given: dict[str, Any]) -> bool:
        return "direction_layer" in given

    def reads_model(self, settings: Any) -> bool:
        return bool(getattr(settings, "direction_optimise", 0))

    def check(self, settings: DirectionSettings, request: Any) -> None:
        if settings.utility_scores is None:
            raise ConfigError(
                "--direction-layer needs two mean-activations sets: --scores HARMFUL "
                "--utility-scores HARMLESS"
            )
        if settings.direction_optimise and getattr(request, "model", None) is None:
            raise ConfigError(
                f"--direction-optimise {settings.direction_optimise} trains on the model: pass "
                "--model"
            )
        if settings.direction_optimise:
            _check_whole_writers(request.model)
        if settings.direction_per_layer and settings.direction_optimise:
            raise ConfigError(
                "--direction-per-layer takes each layer's own direction, which "
                "--direction-optimise does not refine: drop one of the two"
            )
        if settings.direction_per_layer and settings.directions > 1:
            raise ConfigError(
                f"--direction-per-layer removes one direction per layer: drop --directions "
                f"{settings.directions}"
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
        """A random unit vector (orthonormal vectors, as many) as wide as the matched
        direction (its /direction)."""
        from wandacli.store.schema import DIRECTION_DATASET

        matched_shape = matched.read_raw(DIRECTION_DATASET).shape
        hidden, count = int(matched_shape[0]), int(np.prod(matched_shape[1:]))
        generator = torch.Generator().manual_seed(seed)
        r = random_orthonormal(hidden, count, generator)
        r = r.reshape(-1) if count == 1 else r
        # Removed from each writer as the matched edit did (as r alone where it predates the
        # per-writer record), applied as it was.
        writers = matched.meta.get("writers")
        treated = {k: writers[k] for k in keys if k in writers} if writers else None
        return removing(r, keys, shapes, self.stored_shape(matched.meta), treated)

    def control_meta(self, matched_meta: dict[str, Any]) -> dict[str, Any]:
        shape = self.stored_shape(matched_meta)
        meta: dict[str, Any] = {
            "embedding": shape.embedding,
            "rule": CONTROL_RULE,
            "direction_scale": shape.scale,
        }
        if matched_meta.get("writers"):
            meta["writers"] = matched_meta["writers"]
        if shape.norm_preserving:
            meta["norm_preserving"] = NORM_RULE_TEXT[shape.norm_preserving]
        for copied in ("layer_weights", "layer_weights_rule"):
            if copied in matched_meta:
                meta[copied] = matched_meta[copied]
        return meta

    def stored_shape(self, meta: dict[str, Any]) -> EditShape:
        """How a stored direction edit is applied: its `direction_scale` (1 before it
        existed), its norms kept or not (not before the option), the embedding edited or not,
        and each writer's own share where it has per-layer weights."""
        modules = meta.get("modules") or {}
        scales = {k: float(m["scale"]) for k, m in modules.items() if "scale" in m}
        return EditShape(
            scale=float(meta.get("direction_scale", 1.0)),
            norm_preserving=NORM_RULES.get(str(meta.get("norm_preserving")), 0),
            embedding=bool(meta.get("embedding", True)),
            module_scales=scales or None,
        )

    def default_name(self, request: Any, sets: Sets) -> str:
        settings = request.settings
        assert sets.secondary is not None
        assert settings.direction_layer is not None
        layer = settings.direction_layer + settings.direction_fraction
        scale = f"a{settings.direction_scale:g}" if settings.direction_scale != 1.0 else ""
        projected = f"-{PROJECTIONS[settings.direction_projected]}"
        kept = ("", "-norm-preserving", "-row-norm-preserving")[settings.norm_preserving]
        embedding = "" if settings.direction_embedding else "-writers-only"
        count = f"-k{settings.directions}" if settings.directions > 1 else ""
        count += "-per-layer" if settings.direction_per_layer else ""
        count += f"-rdo{settings.direction_optimise}" if settings.direction_optimise else ""
        shaped = "".join(
            f"-{component}{k.max_weight:g}at{k.max_weight_position:g}min{k.min_weight:g}"
            f"d{'all' if math.isinf(k.min_weight_distance) else format(k.min_weight_distance, 'g')}"
            for component, k in self.shaped(settings).items()
        )
        return file_safe_name(
            f"{sets.primary.name}-minus-{sets.secondary.name}.direction-l"
            f"{layer:g}p{settings.direction_position}{scale}"
            f"{count}{projected if settings.direction_projected else ''}{kept}{embedding}{shaped}"
        )

    def direction(self, settings: DirectionSettings, sets: Sets) -> torch.Tensor | None:
        """r̂ from the two means (float64), orthogonalised against the harmless mean with
        --direction-projected 1 or 2, refined by --direction-optimise where asked; None where
        the means are equal there (the embeddings' output at the template's own tokens is the
        same for every prompt): nothing to remove."""
        start = self.start_direction(settings, sets)
        if start is None or not settings.direction_optimise:
            return start
        return self.optimised(settings, sets, start)

    def start_direction(self, settings: DirectionSettings, sets: Sets) -> torch.Tensor | None:
        """r̂ (or the K principal directions) before any optimisation."""
        harmful = sets.extra["means"][0]
        layer = settings.direction_layer
        assert layer is not None
        at = partial(self.stream_direction, settings, sets)
        r = at(layer)
        fraction = settings.direction_fraction
        if r is not None and settings.directions > 1:
            if fraction:
                raise ConfigError(
                    f"--directions {settings.directions} takes a whole layer's prompts: drop "
                    "--direction-fraction"
                )
            return self.principal(settings, sets, r)
        if r is None or fraction == 0:
            return r
        if layer + 1 >= harmful.shape[0]:
            raise ConfigError(
                f"--direction-fraction {fraction:g} interpolates toward layer {layer + 1}, "
                f"beyond the sets' streams 0..{harmful.shape[0] - 1}: lower --direction-layer"
            )
        following = at(layer + 1)
        if following is None:
            return r
        mixed = (1 - fraction) * r + fraction * following
        return mixed / mixed.norm()

    def stream_direction(
        self, settings: DirectionSettings, sets: Sets, stream: int
    ) -> torch.Tensor | None:
        """r̂ at one residual stream and the position (projected as asked); None where the
        two means are equal there."""
        from wandacli.removal.direction import projected_direction, refusal_direction

        harmful, harmless = sets.extra["means"]
        position = settings.direction_position
        if 0 <= stream < harmful.shape[0] and -harmful.shape[1] <= position <= -1:
            index = harmful.shape[1] + position
            if not np.any(harmful[stream, index] != harmless[stream, index]):
                return None
        r = refusal_direction(harmful, harmless, stream, position)
        if settings.direction_projected:
            return projected_direction(r, harmless[stream, harmful.shape[1] + position])
        return r

    def principal(self, settings: DirectionSettings, sets: Sets, r: torch.Tensor) -> torch.Tensor:
        """The top --directions principal directions of the harmful prompts' differences from
        the harmless mean at the layer and position (projected as asked), [d, K]."""
        from wandacli.removal.direction import principal_directions, projected_direction

        if "per_prompt" not in sets.extra:
            sets.extra["per_prompt"] = sets.primary.per_prompt()
        streams = sets.extra["per_prompt"]
        if streams is None:
            raise ConfigError(
                f"--directions {settings.directions} needs each harmful prompt's streams: score "
                f"{sets.primary.name} again with --per-prompt"
            )
        harmless = sets.extra["means"][1]
        layer, index = settings.direction_layer, harmless.shape[1] + settings.direction_position
        basis = principal_directions(
            streams[:, layer, index], harmless[layer, index], settings.directions, r
        )
        if settings.direction_projected:
            return projected_direction(basis, harmless[layer, index])
        return basis

    def optimised(
        self, settings: DirectionSettings, sets: Sets, start: torch.Tensor
    ) -> torch.Tensor:
        """The start refined by RDO (removal/optimised_direction.py): trained once per start,
        model and settings, kept in the store's directions/ and in memory."""
        from wandacli.removal import optimised_direction as rdo
        from wandacli.store.schema import Store

        loaded = sets.extra.get("loaded")
        assert loaded is not None, "reads_model() has prune and search load the model"
        optimisation = rdo.Optimisation(
            steps=settings.direction_optimise, retain_weight=settings.direction_retain_weight
        )
        layer = settings.direction_layer
        assert layer is not None
        embedding = bool(settings.direction_embedding)
        key = rdo.cache_key(loaded, sets, start, layer, embedding, optimisation)
        cached = sets.extra.setdefault("optimised", {})
        if key not in cached:
            path = Store(sets.root).optimised_direction_path(key)
            found = rdo.read_cached(path)
            if found is None:
                harmful, harmless = sets.extra["means"]
                index = harmful.shape[1] + settings.direction_position
                difference = harmful[layer, index].astype(np.float64) - harmless[layer, index]
                writers = [lin for lin in loaded.linear_layers if lin.key in set(sets.keys)]
                found = rdo.optimise(
                    loaded,
                    start,
                    harmful=rdo.set_prompt_ids(sets.primary, loaded.tokenizer),
                    harmless=rdo.set_prompt_ids(sets.secondary, loaded.tokenizer),
                    writers=writers,
                    layer=layer,
                    addition_norm=float(np.linalg.norm(difference)),
                    embedding=embedding,
                    settings=optimisation,
                    reporter=sets.extra.get("reporter") or NullReporter(),
                )
                rdo.write_cached(path, *found)
            cached[key] = found
        basis, record = cached[key]
        sets.extra["optimised_record"] = record
        return basis if start.dim() > 1 else basis[:, 0]

    def prepare_trials(self, sets: Sets, loaded: Any, reporter: Any) -> Any:
        """The loaded model kept for --direction-optimise's training (its trials train once
        per direction they ask for)."""
        sets.extra["loaded"] = loaded
        return None

    def content(
        self, settings: DirectionSettings, sets: Sets, loaded: Any, reporter: Any
    ) -> EditContent:
        sets.extra["loaded"], sets.extra["reporter"] = loaded, reporter
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
        layers = {int(key.split("/", 1)[0]) for key in sets.keys}
        if settings.direction_per_layer:
            own = {i: self.stream_direction(settings, sets, i + 1) for i in sorted(layers)}
            per_layer = {i: d for i, d in own.items() if d is not None}
        elif settings.direction_projected == 2:
            from wandacli.removal.direction import biprojected_directions

            harmless = sets.extra["means"][1]
            index = harmless.shape[1] + settings.direction_position
            per_layer = biprojected_directions(r, harmless[:, index], layers)
        weights = self.writer_weights(settings, sets)
        keys = [key for key in sets.keys if weights[key] != 0]  # beyond a kernel: untouched
        if settings.direction_per_layer and per_layer is not None:
            # a layer whose stream has no direction (equal means there) keeps its writers
            keys = [key for key in keys if int(key.split("/", 1)[0]) in per_layer]
        shape = EditShape(
            scale=settings.direction_scale,
            norm_preserving=settings.norm_preserving,
            embedding=bool(settings.direction_embedding),
            module_scales={k: weights[k] for k in keys} if self.shaped(settings) else None,
        )
        return removing(
            r,
            keys,
            sets.fingerprint.shapes,
            shape,
            treatments(keys, sets.fingerprint.family),
            per_layer=per_layer,
        )

    def shaped(self, settings: DirectionSettings) -> dict[str, layer_weights.LayerKernel]:
        """Each component's kernel where its options were given, peaking by default at the
        direction's layer (with its fraction)."""
        assert settings.direction_layer is not None
        peak = settings.direction_layer + settings.direction_fraction
        return layer_weights.kernels(settings, peak)

    def writer_weights(self, settings: DirectionSettings, sets: Sets) -> dict[str, float]:
        """Per selected writer, its share of the edit: α times its component's kernel at
        its layer (α alone where the component is not shaped)."""
        declared = family_named(sets.fingerprint.family)
        components = {k: declared.writer_component(k.split("/", 1)[1]) for k in sets.keys}
        weights = layer_weights.writer_weights(sets.keys, components, self.shaped(settings))
        return {k: settings.direction_scale * w for k, w in weights.items()}

    def stored_bytes(self, settings: DirectionSettings, sets: Sets) -> int:
        return settings.directions * super().stored_bytes(settings, sets)

    def stored_meta(self, settings: DirectionSettings, sets: Sets) -> dict[str, Any]:
        shaped = self.shaped(settings)
        return {
            "embedding": bool(settings.direction_embedding),
            "direction": {
                "layer": settings.direction_layer,
                "position": settings.direction_position,
                "rule": RULE,
                **(
                    {
                        "projected": (PROJECTED_RULE, BIPROJECTED_RULE)[
                            settings.direction_projected - 1
                        ]
                    }
                    if settings.direction_projected
                    else {}
                ),
                **(
                    {"fraction": settings.direction_fraction, "fraction_rule": FRACTION_RULE}
                    if settings.direction_fraction
                    else {}
                ),
                **(
                    {"count": settings.directions, "count_rule": DIRECTIONS_RULE}
                    if settings.directions > 1
                    else {}
                ),
                **({"per_layer": PER_LAYER_RULE} if settings.direction_per_layer else {}),
                **(
                    {"optimised": sets.extra.get("optimised_record")}
                    if settings.direction_optimise
                    else {}
                ),
            },
            **(
                {
                    "layer_weights": {
                        component: kernel.to_json() for component, kernel in shaped.items()
                    },
                    "layer_weights_rule": layer_weights.RULE,
                }
                if shaped
                else {}
            ),
            "direction_scale": settings.direction_scale,
            **(
                {"norm_preserving": NORM_RULE_TEXT[settings.norm_preserving]}
                if settings.norm_preserving
                else {}
            ),
            "family": family_named(sets.fingerprint.family).name,
            "writers": treatments(sets.keys, sets.fingerprint.family),
            "mean_activations": [
                _describe_means(sets.primary, "harmful"),
                _describe_means(sets.secondary, "harmless"),
            ],
        }

    def may_leave_lower_layers(self, ranges: dict[str, ParameterRange], keys: list[str]) -> bool:
        """Where some trials leave the embedding alone (`--direction-embedding 0` or 0:1), a
        kernel may leave the lower layers too."""
        embedding = ranges.get("direction_embedding")
        return embedding is not None and embedding.low == 0

    def check_ranges(
        self, ranges: dict[str, ParameterRange], sets: Sets, model: Any = None
    ) -> None:
        """The ranges within the sets' streams and positions; a model RDO can train on."""
        optimise = ranges.get("direction_optimise")
        if optimise is not None and optimise.high > 0 and model is not None:
            _check_whole_writers(model)
        streams, positions = sets.fingerprint.num_layers + 1, sets.primary.positions
        if ranges["direction_layer"].high > streams - 1:
            raise ConfigError(
                f"--direction-layer {ranges['direction_layer']} reaches above the sets' residual "
                f"streams 0..{streams - 1}"
            )
        fraction = ranges.get("direction_fraction")
        if (
            fraction is not None
            and fraction.high > 0
            and ranges["direction_layer"].high >= streams - 1
        ):
            raise ConfigError(
                f"--direction-fraction {fraction} interpolates toward the next layer, beyond the "
                f"sets' last stream {streams - 1}: lower --direction-layer's top"
            )
        per_layer, count = ranges.get("direction_per_layer"), ranges.get("directions")
        if per_layer is not None and per_layer.high >= 1 and count is not None and count.high > 1:
            raise ConfigError(
                f"--direction-per-layer {per_layer} with --directions {count}: per-layer removes "
                "one direction per layer; search one of the two"
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
        shape: EditShape | None = None,
        hidden: int = 0,
        family: str | None = None,
    ) -> EditContent:
        """A seeded random unit vector removed the same way: the same writers, the
        embedding where the matched edit changed it, the same shares, norms kept where it
        kept them."""
        generator = torch.Generator().manual_seed(seed)
        count = max(removed.values(), default=1) or 1  # the matched edit's directions
        r = random_orthonormal(hidden, count, generator)
        r = r.reshape(-1) if count == 1 else r
        keys = [key for key, rank in removed.items() if rank > 0]  # beyond a kernel: untouched
        return removing(r, keys, shapes, shape or EditShape(), treatments(keys, family))


def treatments(keys: list[str], family: str | None) -> dict[str, dict[str, Any]]:
    """Per writer, what removing a direction does to it, as the model's family declares."""
    declared = family_named(family)
    return {key: declared.writer_treatment(key.split("/", 1)[1]) for key in keys}


def removing(
    r: torch.Tensor,
    keys: list[str],
    shapes: dict[str, tuple[int, int]],
    shape: EditShape,
    writers: dict[str, dict[str, Any]] | None,
    *,
    per_layer: dict[int, torch.Tensor] | None = None,
) -> EditContent:
    """r removed from every writer in `keys` (as `writers` says: orthogonal to r or to the
    normed direction, its bias too) and, as `shape` says, from the embedding, r rounded to
    float32 as the file stores it (once, at /direction; every writer's `remove` basis is it,
    or, with `per_layer` (biprojected), its layer's own direction, stored per writer); each
    writer at its own share where `shape` has one (per-layer weights), else at its scale."""
    stored = r.float().reshape(r.shape[0], -1).numpy()
    count = stored.shape[1]
    own = {i: d.float().reshape(d.shape[0], -1).numpy() for i, d in (per_layer or {}).items()}
    modules = [
        EditModule(
            key,
            {"remove": own.get(int(key.split("/", 1)[0]), stored)},
            removed_rank=count,
            full_rank=min(shapes[key]),
            ranks={"remove": count},
            scale=shape.module_scale(key),
        )
        for key in keys
    ]
    return EditContent(
        "direction",
        modules,
        remove_direction,
        direction=stored,
        writers=writers,
        **shape.content_fields(),
    )


def remove_direction(
    weight: torch.Tensor, bases: dict[str, torch.Tensor], scale: float = 1.0
) -> torch.Tensor:
    """W − α r rᵀ W (W − α R Rᵀ W for several directions), r made unit length (R
    orthonormal) again in float64 (it is stored float32)."""
    from wandacli.removal.direction import orthonormal
    from wandacli.removal.ranks import in_float64, project

    w, as64 = in_float64(weight, bases)
    r = orthonormal(as64["remove"])
    r = r.reshape(r.shape[0], -1)  # [d, K]: W − α R Rᵀ W
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


def _check_whole_writers(model: Any) -> None:
    """RDO's training hooks project whole writer modules' outputs: a model whose writers are
    slices of one parameter (experts in transformers 5) is refused from its config alone,
    before any weight loads."""
    from wandacli.models.loader import model_structure
    from wandacli.removal.direction import writer_keys
    from wandacli.removal.optimised_direction import sliced_writer

    structure = model_structure(model)
    writers = set(writer_keys(structure.fingerprint, structure.hidden_size))
    for lin in structure.layers:
        if lin.key in writers and lin.module_name is not None:
            raise sliced_writer(lin)
