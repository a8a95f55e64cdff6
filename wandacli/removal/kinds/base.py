"""What a kind of removal is: the contract every module in removal/kinds/ fulfils.

A kind owns
- its settings: a dataclass of its own options (config/declare.py), validated by `check`;
- the options that choose it on `prune`'s command line (`claims`);
- its search space (`search_space`), when `search` can search it;
- the sets it reads (`open`) and its checks on them (`check_sets`);
- the one computation of what it removes (`MaskKind.mask`, `EditKind.content` and its formula
  `edited_weight`), used by `prune` (which writes the result to the store), by a search's
  trials (which apply it to the loaded model and undo it) and by evaluation (which reads the
  file back into the same form), so that a kept trial is the trial by construction;
- what its file's meta records (`stored_meta`), and its random control (`control`).

The registry (removal/kinds/__init__.py) lists the kinds; `prune`, `search`, the evaluation
commands, the pipeline and `report` find a kind there and never name one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from wandacli.config.declare import declared_fields
from wandacli.config.ranges import ParameterRange
from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.removal.content import EditShape

Family = Literal["mask", "edit"]


@dataclass(frozen=True)
class Searchable:
    """A parameter a search ranges over: the field of the kind's settings it sets, the
    search's flag (`--p 0.02:0.2`), and its kind of values."""

    name: str
    flag: str
    help: str
    integer: bool = False
    # Fractions of weights span orders of magnitude (log scale); a share of one direction
    # does not (linear).
    linear: bool = False
    check: Callable[[ParameterRange, str], None] | None = None
    # The value a trial takes when the search does not range over it (None: it must, unless
    # `optional`).
    fixed: float | None = None
    # Not ranged over, it stays unset (a kernel's parameter: the component is not shaped).
    optional: bool = False
    # Searched over [fixed, fixed] when not given, so that every trial names it (a direction's
    # position: searches made before it could be ranged recorded it so).
    ranged_when_fixed: bool = False

    def parse(self, text: str) -> ParameterRange:
        return ParameterRange.parse(text, self.flag, integer=self.integer)


@dataclass
class Sets:
    """The stored sets a removal is computed from, open and checked to be of one model: the
    `--scores` set, the second set (`--utility-scores`) where the kind reads one, and the
    modules the removal may change."""

    primary: Any
    secondary: Any | None
    keys: list[str]
    root: Path
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    extra: dict[str, Any] = field(default_factory=dict)  # a matched mask or edit, means, ...

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self.primary.fingerprint

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> Sets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemovalKind:
    """The base of every kind; see the module docstring."""

    name: ClassVar[str]  # the registry key; a file's `mode` names its kind
    family: ClassVar[Family]
    title: ClassVar[str]  # "the set difference", in messages
    selector: ClassVar[str] = ""  # the flag that asks for it, in messages
    # Where its options rule out another mask kind's ("to the set difference").
    alongside: ClassVar[str] = ""
    settings: ClassVar[type]  # the dataclass of its own options
    # What its options do, in a conflict message ("removes one direction").
    does: ClassVar[str]
    search_space: ClassVar[tuple[Searchable, ...]] = ()
    # The sets of searched parameters that make one search of this kind: a search ranges over
    # one group whole, and over any of the optional parameters (those with `fixed` values).
    search_groups: ClassVar[tuple[frozenset[str], ...]] = ()
    search_usage: ClassVar[str] = ""  # how to ask for it, in the search's one-line error
    # What `search` calls it in its summaries, when it differs from `name`.
    searched_as: ClassVar[str | None] = None
    # The stored modes a file of this kind may have (a kind may write several).
    modes: ClassVar[tuple[str, ...]] = ()
    # Whether it reads the model's weights (then the model is part of its request).
    reads_weights: ClassVar[bool] = False
    # What `prepare_trials` does once before a search's trials, as its progress says it, with
    # one step per stored set and matrix (None: nothing worth a progress bar).
    preparation: ClassVar[str | None] = None

    def reads_model(self, settings: Any) -> bool:
        """Whether a removal with these settings runs the model (then the model and its dtype
        are part of its request): the kind's weights, or what its settings ask for."""
        return self.reads_weights

    # -- choosing and checking ------------------------------------------------------------

    def claims(self, given: dict[str, Any]) -> bool:
        """Whether the options given (those that differ from their defaults) ask for this
        kind."""
        raise NotImplementedError

    def claims_alone(self, given: dict[str, Any]) -> bool:
        """Whether the options given ask for this kind when no kind claims them: an option
        several kinds read (--utility-scores) chooses one only by itself."""
        return False

    @property
    def option_names(self) -> frozenset[str]:
        return frozenset(f.name for f in declared_fields(self.settings))

    def check(self, settings: Any, request: Any) -> None:
        """Rules that relate this kind's options to each other and to the request's."""

    # -- the sets it reads ----------------------------------------------------------------

    def open(self, request: Any, root: Path) -> Sets:
        """The sets this kind reads, open and checked (one model, the modules chosen)."""
        raise NotImplementedError

    def check_sets(self, settings: Any, sets: Sets, request: Any) -> None:
        """Rules between the settings and the sets opened (a rank within every module's)."""

    def default_name(self, request: Any, sets: Sets) -> str:
        raise NotImplementedError

    # -- what it removes ------------------------------------------------------------------

    def stored_meta(self, settings: Any, sets: Sets) -> dict[str, Any]:
        """What its file's meta records beyond what every removal records."""
        return {}

    def reference_method(self, meta: dict[str, Any]) -> str:
        """The reference's `prune_method` for a file of this kind (its results log's first
        column): the score method by default."""
        sets = meta.get("score_sets") or [{}]
        return str(sets[0].get("method") or "unknown")

    # -- searching it ---------------------------------------------------------------------

    @property
    def search_name(self) -> str:
        return self.searched_as or self.name

    def may_leave_lower_layers(self, ranges: dict[str, ParameterRange], keys: list[str]) -> bool:
        """Whether a trial may leave the embedding and decoder layer 0 as they are, so that its
        KL can run from a higher layer (evaluation/lower_layers.py): here, where none of the
        matrices `keys` ("<layer>/<module>") is in layer 0."""
        return min((int(key.split("/", 1)[0]) for key in keys), default=0) >= 1

    def check_ranges(
        self, ranges: dict[str, ParameterRange], sets: Sets, model: Any = None
    ) -> None:
        """A search's ranges checked against the sets (a rank within every module's) and,
        where a range trains on it, the model (its config alone: nothing loads)."""

    def prepare_trials(self, sets: Sets, loaded: Any, reporter: Any) -> Any:
        """What every trial of a search needs, computed once (None: nothing)."""
        return None

    def accepts(self, names: set[str]) -> bool:
        """Whether ranges over `names` are a search of this kind."""
        optional = {p.name for p in self.search_space if p.fixed is not None or p.optional}
        return any(group <= names <= group | optional for group in self.search_groups)

    def search_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """The options a trial's parameters stand for (plus what the search fixes)."""
        values: dict[str, Any] = {}
        for parameter in self.search_space:
            if parameter.name in params:
                value = params[parameter.name]
            elif parameter.fixed is not None:
                value = parameter.fixed
            else:
                continue
            values[parameter.name] = int(value) if parameter.integer else float(value)
        return values


# Filled by the registry (removal/kinds/__init__.py) as it lists the kinds, so that a kind can
# find another by a stored file's mode (a control finds the kind of the edit it matches)
# without importing the registry that imports it.
_BY_MODE: dict[str, RemovalKind] = {}


def register(kind: RemovalKind) -> RemovalKind:
    for mode in (kind.name, *kind.modes):
        _BY_MODE.setdefault(mode, kind)
    return kind


def kind_of_mode(mode: str) -> RemovalKind:
    """The kind that writes files of `mode` (a mask's or an edit's meta `mode`)."""
    try:
        return _BY_MODE[mode]
    except KeyError:
        raise StoreError(
            f"no kind of removal writes mode {mode!r}: made by a newer wandacli?"
        ) from None


def same_model(primary: Any, secondary: Any, mine: str, theirs: str, detail: str) -> None:
    """Refuse two sets of different models (`detail` says how to say so)."""
    mismatch = primary.fingerprint.first_mismatch(secondary.fingerprint, mine=mine, theirs=theirs)
    if mismatch:
        raise StoreError(f"{detail}: {mismatch}")


def refuse_foreign_option(
    flag: str, owners: list[RemovalKind], chosen: RemovalKind, claimers: list[RemovalKind]
) -> None:
    """An option of other kinds (`owners`) given beside the chosen kind's: one line naming
    both. An owner among `claimers` was asked for too (two kinds at once)."""
    claimed = [kind for kind in owners if kind in claimers]
    owner = claimed[0] if claimed else owners[0]
    if (
        owner.family == "mask"
        and chosen.family == "edit"
        and all(k.family == "mask" for k in owners)
    ):
        raise ConfigError(
            f"{flag} chooses weights for a mask; {chosen.title} {chosen.does}: drop one of them"
        )
    if not claimed:
        titles = " or ".join(kind.title for kind in owners)
        selectors = " or ".join(kind.selector for kind in owners)
        raise ConfigError(f"{flag} belongs to {titles}: give it with {selectors}, or drop it")
    if owner.family == chosen.family == "mask":
        raise ConfigError(f"{flag} does not apply {chosen.alongside}: drop one of them")
    raise ConfigError(f"{flag} {owner.does}; {chosen.selector} {chosen.does}: drop one of them")


# ---------------------------------------------------------------------------------------------
# What kinds share


def name_suffix(request: Any) -> str:
    """The part of a default name that says which modules a removal was limited to."""
    suffix = ""
    if request.layers:
        suffix += ".L" + request.layers.replace(",", "_")
    if request.modules:
        suffix += ".M" + request.modules
    return suffix


@contextlib.contextmanager
def closing_on_error() -> Iterator[contextlib.ExitStack]:
    """An exit stack for the files a kind opens: closed if opening fails, handed on to the
    Sets (which closes it) if not."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    except BaseException:
        stack.close()
        raise


def open_score_sets(request: Any, root: Path, secondary: str | None) -> Sets:
    """The `--scores` set of per-weight scores (and a second one), checked to be of one model
    (fingerprint and id: two checkpoints of one architecture share a fingerprint)."""
    from wandacli.removal.selection import selected_keys
    from wandacli.store.files import open_score_set

    with closing_on_error() as stack:
        primary = stack.enter_context(open_score_set(request.scores, root))
        other = None
        if secondary is not None:
            other = stack.enter_context(open_score_set(secondary, root))
            same_model(
                primary,
                other,
                "safety scores",
                "utility scores",
                "the safety and utility score sets come from different models",
            )
            ids = primary.meta["model"].get("id"), other.meta["model"].get("id")
            if ids[0] != ids[1]:
                raise StoreError(
                    f"the safety and utility score sets come from different models ({ids[0]} vs "
                    f"{ids[1]}): score both on the same model"
                )
        keys = selected_keys(request, primary.fingerprint)
        return Sets(primary, other, keys, root, stack)


class MaskKind(RemovalKind):
    """A kind whose removal is a mask: per matrix, the weights set to zero."""

    family: ClassVar[Family] = "mask"
    # How a matrix's scores are ranked for this kind: per row, or over the whole matrix.
    per_row: ClassVar[bool] = False
    # Options a search fixes for this kind (the top of a score set prunes the highest).
    search_fixed: ClassVar[dict[str, Any]] = {}
    preparation: ClassVar[str | None] = "ranking the stored scores"

    def mode(self, settings: Any) -> str:
        return self.name

    def mask(self, settings: Any, sets: Sets, rankings: Any, key: str) -> Any:
        """One matrix's mask (bool [out, in], True = pruned)."""
        raise NotImplementedError

    def direct_rankings(self, sets: Sets) -> tuple[Any, Any]:
        """The sets' scores, selected when asked (what `prune` reads)."""
        from wandacli.removal.presorted import DirectRanking

        return (
            DirectRanking(sets.primary.read, per_row=self.per_row),
            DirectRanking(sets.secondary.read, per_row=self.per_row) if sets.secondary else None,
        )

    def presorted_rankings(
        self, sets: Sets, bounds: dict[str, float], on_matrix: Callable[[], None]
    ) -> tuple[Any, Any]:
        """The sets' scores ranked once up to the search's largest fractions (`bounds`, by
        parameter name), so that each trial's mask is a slice (search)."""
        raise NotImplementedError

    def content(self, settings: Any, sets: Sets, rankings: tuple[Any, Any]) -> Any:
        from wandacli.removal.content import MaskContent

        return MaskContent(sets.keys, lambda key: self.mask(settings, sets, rankings, key))

    def effective_ratio(self, settings: Any) -> float | None:
        return None

    def remade(self, meta: dict[str, Any], sets: Sets) -> list[str]:
        """What changed since a finished mask of this request was made, beyond its score
        sets (a matched mask remade)."""
        return []


class EditKind(RemovalKind):
    """A kind whose removal is an edit: per module, ranks (or a direction) subtracted."""

    family: ClassVar[Family] = "edit"

    def content(self, settings: Any, sets: Sets, loaded: Any, reporter: Any) -> Any:
        """The edit, module by module (an EditContent)."""
        raise NotImplementedError

    def edited_weight(self, weight: Any, bases: dict[str, Any], scale: float = 1.0) -> Any:
        """One module's weight after the edit, in float64, from its bases (as the file stores
        them, or as the kind computed them): the kind's formula, the one every caller uses."""
        raise NotImplementedError

    def stored_shape(self, meta: dict[str, Any]) -> EditShape:
        """How a stored file of this kind is applied beyond its bases (removal/content.py):
        all of each module's edit, for every kind but one that records otherwise."""
        return EditShape()

    def control_of_stored(
        self, matched: Any, keys: list[str], shapes: dict[str, tuple[int, int]], seed: int
    ) -> Any:
        """`prune --match-ranks`: the control of a stored edit of this kind (an EditFile),
        as much removed from each of `keys` as it removes there."""
        removed = {k: int(matched.meta["modules"][k]["removed_rank"]) for k in keys}
        return self.control(removed, shapes, seed, shape=self.stored_shape(matched.meta))

    def control_meta(self, matched_meta: dict[str, Any]) -> dict[str, Any]:
        """What the file of such a control records of how it was drawn."""
        return {}

    def stored_bytes(self, settings: Any, sets: Sets) -> int:
        """About how many bytes its file's arrays take (the free-space check)."""
        return 4 * sum(sets.fingerprint.shapes[k][0] for k in sets.keys)

    def trial_content(self, settings: Any, sets: Sets, prepared: Any) -> Any:
        """A search's trial: the EditContent `content` would give, from what
        `prepare_trials` computed once (None: it removes nothing)."""
        raise NotImplementedError(f"{self.name} is not searchable")

    def control(
        self,
        removed: dict[str, int],
        shapes: dict[str, tuple[int, int]],
        seed: int,
        *,
        shape: EditShape | None = None,
        hidden: int = 0,
        family: str | None = None,
    ) -> Any:
        """The random control of an edit of this kind that removed `removed` per module (an
        EditContent): as much removed, in directions chosen without data (`family`: the
        model's, where the kind's edit depends on it), applied as the matched edit's `shape`
        says (its share per module, its norms kept, its embedding)."""
        raise NotImplementedError(f"{self.name} has no control")

    def remade(self, meta: dict[str, Any], sets: Sets) -> list[str]:
        return []


def edit_kind_of_mode(mode: str) -> EditKind:
    """The edit kind that writes edits of `mode`."""
    kind = kind_of_mode(mode)
    if not isinstance(kind, EditKind):
        raise StoreError(f"mode {mode!r} is a mask's, not an edit's")
    return kind
