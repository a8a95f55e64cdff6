"""Options that several kinds of removal read, each declared once here; a kind's settings
class takes the field from here (`utility_scores: str | None = utility_scores()`), so that the
flag, help and rule are one declaration however many kinds read it."""

from __future__ import annotations

from typing import Any

from wandacli.config.declare import option, or_more, within
from wandacli.core.errors import ConfigError

RANKS_PANEL = "Rank edits (actsvd)"
DIRECTION_PANEL = "Refusal direction"
SET_DIFFERENCE_PANEL = "Set difference"


def utility_scores() -> Any:
    return option(
        None,
        "--utility-scores",
        help="The second set. Set difference: the utility scores whose top-p weights are spared "
        "(the top-q of --scores not among them are pruned, per matrix; --prune-highest is "
        "ignored, as the reference does). Orthogonal projection: the utility rank statistics. "
        "Refusal direction: the harmless mean activations.",
        panel=SET_DIFFERENCE_PANEL,
    )


def _pruning_fraction(value: float, flag: str) -> None:
    if value == 0:
        raise ConfigError(
            f"{flag} 0 prunes nothing: use a fraction in (0, 1), e.g. 0.5 (the dense model "
            "needs no mask: evaluate it without --mask)"
        )
    within(0, 1, low_open=True, high_open=True)(value, flag)


def sparsity_ratio() -> Any:
    return option(
        None,
        "--sparsity-ratio",
        "-r",
        help="Fraction of each row (or matrix) to prune, in (0, 1).",
        check=_pruning_fraction,
    )


def prune_highest() -> Any:
    return option(
        False,
        "--prune-highest",
        "--neg-prune",
        help="Prune the highest-scored weights instead of the lowest (the reference's --neg_prune).",
    )


def sequential() -> Any:
    return option(
        False,
        "--sequential",
        help="Rank edits in the reference's order: layer by layer, each layer's inputs "
        "recorded after the layers before it were edited (runs the model again on the sets' "
        "recorded data; about L/2 passes over it for L layers).",
        panel=RANKS_PANEL,
    )


def control_seed() -> Any:
    return option(
        0,
        "--seed",
        help="--match-ranks: the random directions' seed (a random mask's seed is its score "
        "set's: `score --method random --seed`).",
        panel=RANKS_PANEL,
        check=or_more(0),
    )


def rank(flag: str, help: str) -> Any:
    return option(None, flag, help=help, panel=RANKS_PANEL, check=or_more(0))
