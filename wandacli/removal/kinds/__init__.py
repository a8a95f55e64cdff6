"""The kinds of removal, one module each, and this registry: the one list of them. `prune`,
`search`, the evaluation commands, the pipeline and `report` find a kind here (by the options
given, by a stored file's mode, by a search's ranges) and never name one.

Adding a kind is a module in this folder (removal/kinds/base.py says what it provides) and
its line below.
"""

from __future__ import annotations

from typing import Any

from wandacli.config.declare import DeclaredField, declared_fields
from wandacli.removal.kinds import (
    direction,
    matched_counts,
    matched_ranks,
    nm,
    projection,
    rank_removal,
    ratio,
    set_difference,
)
from wandacli.removal.kinds.base import RemovalKind, kind_of_mode, register

# In the order a request is matched against them: the first whose options were given is the
# kind asked for (a control before the kinds it controls, edits before masks).
KINDS: tuple[RemovalKind, ...] = tuple(
    register(kind)
    for kind in (
        direction.KIND,
        matched_ranks.KIND,
        rank_removal.KIND,
        projection.KIND,
        set_difference.KIND,
        matched_counts.KIND,
        nm.KIND,
        ratio.KIND,
    )
)
# What `prune` makes when no kind's options were given (it then asks for a ratio).
DEFAULT_KIND = ratio.KIND


def kind_named(name: str) -> RemovalKind:
    for kind in KINDS:
        if name in (kind.name, kind.searched_as):
            return kind
    raise KeyError(name)


def searchable() -> tuple[RemovalKind, ...]:
    """The kinds `search` can search, in the registry's order."""
    return tuple(kind for kind in KINDS if kind.search_space)


def kind_options() -> list[DeclaredField]:
    """Every kind's options, each once (an option several kinds read is one declaration)."""
    found: dict[str, DeclaredField] = {}
    for kind in KINDS:
        for option in declared_fields(kind.settings):
            found.setdefault(option.name, option)
    return list(found.values())


def owners(option: str) -> list[RemovalKind]:
    """The kinds that read `option`."""
    return [kind for kind in KINDS if option in kind.option_names]


def family_defaults(family: str) -> dict[str, Any]:
    """Every option of a family's kinds at its default: what a request of that family records
    for the options its kind does not read (as files made before kinds had modules did)."""
    defaults: dict[str, Any] = {}
    for kind in KINDS:
        if kind.family == family:
            for option in declared_fields(kind.settings):
                defaults.setdefault(option.name, option.default)
    return defaults


__all__ = ["KINDS", "DEFAULT_KIND", "RemovalKind", "kind_named", "kind_of_mode", "searchable"]
