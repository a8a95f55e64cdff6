"""The settings of `wandacli search`: which removal, over which ranges, measured on which
prompts, for how many trials."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from wandacli.config.evaluation import KL_LIMIT, KL_POSITIONS, KL_PROMPTS
from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ConfigError

SearchKind = Literal["set-difference", "top", "orthogonal-projection", "direction"]
RefusalMeasure = Literal["generation", "score"]

# Every searchable parameter, as the request (search.json) and a pipeline's search entry name
# them; the second tuple's make an edit, not a mask.
RANGE_OPTIONS = (
    "p",
    "q",
    "ratio",
    "safety_ranks",
    "utility_ranks",
    "rank_neg",
    "rank_pos",
    "direction_layer",
    "direction_position",
    "direction_scale",
)
EDIT_RANGE_OPTIONS = RANGE_OPTIONS[3:]

# The evaluation sets a search must not read: the first 100 AdvBench behaviours (what the
# reference and the demo evaluate) and JailbreakBench (the second held-out set).
DEFAULT_HELD_OUT = "advbench:100,jailbreakbench"


@dataclass(frozen=True)
class ParameterRange:
    """`LO:HI`, both ends included; integers for ranks, fractions for p, q and ratios."""

    low: float
    high: float
    integer: bool = False

    @classmethod
    def parse(cls, text: str, flag: str, *, integer: bool = False) -> ParameterRange:
        parts = text.split(":")
        if len(parts) != 2:
            raise ConfigError(
                f"{flag} {text!r}: give a range LO:HI, e.g. {'0:32' if integer else '0.02:0.2'}"
            )
        try:
            low, high = (int(p) if integer else float(p) for p in parts)
        except ValueError:
            kind = "whole numbers" if integer else "numbers"
            raise ConfigError(f"{flag} {text!r}: both ends must be {kind}") from None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"{flag} {text!r}: both ends must be finite")
        if low > high:
            raise ConfigError(f"{flag} {text!r} is empty: LO must not exceed HI")
        return cls(float(low), float(high), integer)

    def check_fraction(self, flag: str) -> None:
        if not 0 < self.low <= self.high <= 1:
            raise ConfigError(f"{flag} {self}: fractions must lie in (0, 1]")

    def check_rank(self, flag: str) -> None:
        if self.low < 0:
            raise ConfigError(f"{flag} {self}: ranks must be 0 or more")

    def __str__(self) -> str:
        if self.integer:
            return f"{int(self.low)}:{int(self.high)}"
        return f"{self.low:g}:{self.high:g}"

    def to_json(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class BestRule:
    """`--keep-best OBJECTIVE:LIMIT`: of the front points whose OBJECTIVE is at most LIMIT, the
    one lowest in the other objective (`refusal:0.5`: the cheapest point that halves the
    refusals; `kl:0.1`: the most refusals removed within a KL budget, the refusal-direction
    reference's filter). Where no front point is within the limit, the one nearest it."""

    objective: Literal["refusal", "kl"]
    limit: float

    @classmethod
    def parse(cls, text: str, flag: str = "--keep-best") -> BestRule:
        objective, _, limit = text.partition(":")
        if objective not in ("refusal", "kl") or not limit:
            raise ConfigError(
                f"{flag} {text!r}: give OBJECTIVE:LIMIT with OBJECTIVE refusal or kl, "
                "e.g. refusal:0.5 or kl:0.1"
            )
        try:
            value = float(limit)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: the limit must be a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{flag} {text!r}: the limit must be finite")
        return cls(objective, value)  # type: ignore[arg-type]

    @property
    def other(self) -> str:
        return "kl" if self.objective == "refusal" else "refusal"

    def choose(self, front: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The chosen point and whether it is within the limit."""
        within = [t for t in front if t[self.objective] <= self.limit]
        if within:
            return min(within, key=lambda t: (t[self.other], t[self.objective], t["index"])), True
        return min(front, key=lambda t: (t[self.objective], t[self.other], t["index"])), False

    def __str__(self) -> str:
        return f"{self.objective}:{self.limit:g}"


@dataclass(frozen=True)
class SearchConfig:
    """Everything `wandacli search` needs. Exactly one kind of removal:
    set difference (`utility_scores` with p and q), top (`ratio`: each row's top fraction of
    the safety scores), or the orthogonal projection (`utility_scores` rank statistics with
    safety/utility ranks, or the reference's rank_neg/rank_pos)."""

    name: str
    scores: str
    model: ModelSpec
    store: Path | None = None
    utility_scores: str | None = None
    p: ParameterRange | None = None
    q: ParameterRange | None = None
    ratio: ParameterRange | None = None
    safety_ranks: ParameterRange | None = None
    utility_ranks: ParameterRange | None = None
    rank_neg: ParameterRange | None = None
    rank_pos: ParameterRange | None = None
    # The refusal direction from two mean-activations sets: its residual stream and position.
    direction_layer: ParameterRange | None = None
    direction_position: ParameterRange | None = None
    direction_scale: ParameterRange | None = None  # the share of it removed, in (0, 1]
    layers: str | None = None
    modules: str | None = None
    trials: int = 40
    startup_trials: int = 10  # TPE's random trials before it models the front
    keep: int = 0
    keep_best: BestRule | None = None
    seed: int = 0
    prompts: str = "advbench"
    prompt_column: str | None = None
    offset: int = 100  # AdvBench's first 100 are the evaluation prompts
    limit: int = 32
    held_out: str = DEFAULT_HELD_OUT
    refusal: RefusalMeasure = "generation"
    max_new_tokens: int = 24
    kl_prompts: str = KL_PROMPTS
    kl_limit: int = KL_LIMIT
    kl_positions: int = KL_POSITIONS
    batch_size: int = 32
    template: str | None = None
    control: bool = True
    data_dir: Path | None = None
    # "tpe": Optuna's search; "reference": the refusal-direction reference's selection over
    # every candidate (layer, position) in the ranges (search/select.py).
    select: Literal["tpe", "reference"] = "tpe"

    def __post_init__(self) -> None:
        given = {
            flag: value
            for flag, value in (
                ("--p", self.p),
                ("--q", self.q),
                ("--ratio", self.ratio),
                ("--safety-ranks", self.safety_ranks),
                ("--utility-ranks", self.utility_ranks),
                ("--rank-neg", self.rank_neg),
                ("--rank-pos", self.rank_pos),
                ("--direction-layer", self.direction_layer),
                ("--direction-position", self.direction_position),
                ("--direction-scale", self.direction_scale),
            )
            if value is not None
        }
        kinds = {
            "set-difference": {"--p", "--q"},
            "top": {"--ratio"},
            "orthogonal-projection": {"--safety-ranks", "--utility-ranks"},
            "reference-ranks": {"--rank-neg", "--rank-pos"},
            "direction": {"--direction-layer", "--direction-position"},
            "direction-last-position": {"--direction-layer"},
            "scaled-direction": {"--direction-layer", "--direction-position", "--direction-scale"},
            "scaled-direction-last-position": {"--direction-layer", "--direction-scale"},
        }
        matching = [k for k, flags in kinds.items() if set(given) == flags]
        if not matching:
            raise ConfigError(
                "search one kind of removal: --p and --q (set difference, with --utility-scores), "
                "--ratio (the top of --scores), --safety-ranks and --utility-ranks (or --rank-neg "
                "and --rank-pos) for the orthogonal projection, or --direction-layer (and "
                "--direction-position, --direction-scale) for the refusal direction; got "
                f"{', '.join(given) or 'no range'}"
            )
        for flag, value in given.items():
            if flag in ("--p", "--q", "--ratio", "--direction-scale"):
                value.check_fraction(flag)
            elif flag == "--direction-position":
                if value.high > -1:
                    raise ConfigError(
                        f"--direction-position {value}: positions count from the end, -1 the "
                        "last prompt token (e.g. -5:-1)"
                    )
            else:
                value.check_rank(flag)
        if self.select == "reference" and self.kind != "direction":
            raise ConfigError(
                "--select reference chooses a refusal direction: give --direction-layer (and "
                "--direction-position) with two mean-activations sets"
            )
        if self.select == "reference" and self.direction_scale is not None:
            raise ConfigError(
                "--select reference scores whole directions, as the reference does: drop "
                "--direction-scale"
            )
        if self.kind == "top" and self.utility_scores is not None:
            raise ConfigError("--ratio searches the top of --scores alone: drop --utility-scores")
        if self.kind != "top" and self.utility_scores is None:
            raise ConfigError(f"the {self.kind} needs --utility-scores")
        for flag, number, least in (
            ("--trials", self.trials, 1),
            ("--limit", self.limit, 1),
            ("--kl-limit", self.kl_limit, 1),
            ("--kl-positions", self.kl_positions, 1),
            ("--max-new-tokens", self.max_new_tokens, 1),
            ("--batch-size", self.batch_size, 1),
            ("--keep", self.keep, 0),
            ("--offset", self.offset, 0),
            ("--startup-trials", self.startup_trials, 1),
        ):
            if number < least:
                raise ConfigError(f"{flag} must be {least} or more (got {number})")

    @property
    def kind(self) -> SearchKind:
        if self.p is not None:
            return "set-difference"
        if self.ratio is not None:
            return "top"
        if self.direction_layer is not None:
            return "direction"
        return "orthogonal-projection"

    @property
    def is_edit(self) -> bool:
        return self.kind in ("orthogonal-projection", "direction")

    def ranges(self) -> dict[str, ParameterRange]:
        """The searched parameters by name (the names of PruneConfig's and EditConfig's fields)."""
        named = {
            "p": self.p,
            "q": self.q,
            "sparsity_ratio": self.ratio,
            "safety_ranks": self.safety_ranks,
            "utility_ranks": self.utility_ranks,
            "rank_neg": self.rank_neg,
            "rank_pos": self.rank_pos,
            "direction_layer": self.direction_layer,
            "direction_position": self.direction_position
            if self.direction_layer is None or self.direction_position is not None
            else ParameterRange(-1, -1, True),
            "direction_scale": self.direction_scale,
        }
        return {k: v for k, v in named.items() if v is not None}

    def request(self) -> dict[str, Any]:
        """What decides the trials (a rerun with the same request continues the study; the
        number of trials and what is kept may grow)."""
        data = self.to_json()
        # Not the trials: how many, what is kept, the control, the held-out check, where.
        for key in (
            "store",
            "trials",
            "keep",
            "keep_best",
            "control",
            "held_out",
            "data_dir",
            "name",
        ):
            data.pop(key, None)
        model = data.pop("model") or {}
        data["model"] = {"model": model.get("model"), "dtype": model.get("dtype")}
        return data

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in self.ranges().items():
            data[{"sparsity_ratio": "ratio"}.get(key, key)] = value.to_json()
        for key in ("store", "data_dir"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["keep_best"] = str(self.keep_best) if self.keep_best is not None else None
        data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        data["kind"] = self.kind
        return data
