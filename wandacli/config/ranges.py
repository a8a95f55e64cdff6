"""Values of search options: a range `LO:HI` a parameter is searched over, and the rule that
keeps one front point (`--keep-best OBJECTIVE:LIMIT`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from wandacli.core.errors import ConfigError


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
