"""The control of an edit (`--match-ranks EDIT`): as much removed from every module as the
edit removes, in directions chosen without data. A rank edit's control removes the same rank
per module in random orthonormal directions; a refusal direction's, a random unit vector from
the writers and the embedding (the matched edit's kind says which). `--scores` only names the
model: nothing stored is read but the matched edit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wandacli.config.declare import option
from wandacli.core.errors import StoreError
from wandacli.core.naming import file_safe_name
from wandacli.removal.content import EditContent, EditModule
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import EditKind, Sets, closing_on_error, edit_kind_of_mode

RANKS_RULE = (
    "per module the rank the matched edit removes, in random orthonormal directions (Gaussian, "
    "then QR; float64, stored float32)"
)


@dataclass(frozen=True)
class MatchedRanksSettings:
    match_ranks: str | None = option(
        None,
        "--match-ranks",
        help="The control of an edit: remove, in every module, as much as this edit does "
        "(name or .h5), in random directions (--seed): a rank edit's rank in random "
        "orthonormal directions, a refusal direction as a random unit vector; --scores only "
        "names the model.",
        panel=options.RANKS_PANEL,
    )
    seed: int = options.control_seed()


class MatchedRanks(EditKind):
    name = "random-ranks"
    title = "the random control of an edit"
    selector = "--match-ranks"
    does = "removes as much as another edit in random directions"
    settings = MatchedRanksSettings
    modes = ("random-ranks",)

    def reference_method(self, meta: dict[str, Any]) -> str:
        return "random"

    def claims(self, given: dict[str, Any]) -> bool:
        return "match_ranks" in given

    def open(self, request: Any, root: Path) -> Sets:
        from wandacli.store.files import EditFile, open_finished_scores, resolve_file

        with closing_on_error() as stack:
            # Any set in scores/ names the model: rank statistics or means.
            model_set: Any = stack.enter_context(
                open_finished_scores(resolve_file(request.scores, root, "score set"))
            )
            reference = str(request.settings.match_ranks)
            matched = stack.enter_context(EditFile(resolve_file(reference, root, "edit")))
            mismatch = model_set.fingerprint.first_mismatch(
                matched.fingerprint, mine="--scores", theirs="--match-ranks edit"
            )
            if mismatch:
                raise StoreError(
                    f"--match-ranks {reference} was made for another model: {mismatch}"
                )
            keys = [k for k in model_set.fingerprint.shapes if k in matched.meta["modules"]]
            sets = Sets(model_set, None, keys, root, stack)
            sets.extra["matched"] = matched
            return sets

    def edited_weight(
        self, weight: torch.Tensor, bases: dict[str, torch.Tensor], scale: float = 1.0
    ) -> torch.Tensor:
        return remove_random_ranks(weight, bases, scale)

    def default_name(self, request: Any, sets: Sets) -> str:
        return file_safe_name(f"random.as-{Path(str(request.settings.match_ranks)).stem}")

    def content(
        self, settings: MatchedRanksSettings, sets: Sets, loaded: Any, reporter: Any
    ) -> EditContent:
        """The matched edit's kind draws its control (random ranks, or a random direction)."""
        matched = sets.extra["matched"]
        kind = edit_kind_of_mode(matched.mode)
        return kind.control_of_stored(matched, sets.keys, sets.fingerprint.shapes, settings.seed)

    def stored_bytes(self, settings: MatchedRanksSettings, sets: Sets) -> int:
        modules = sets.extra["matched"].meta["modules"]
        shapes = sets.fingerprint.shapes
        return sum(shapes[k][0] * int(modules[k]["removed_rank"]) * 4 for k in sets.keys)

    def remade(self, meta: dict[str, Any], sets: Sets) -> list[str]:
        matched = sets.extra["matched"]
        if (meta.get("matched_edit") or {}).get("created") != matched.meta.get("created"):
            return [f"--match-ranks edit {matched.name!r} was remade after this edit"]
        return []

    def stored_meta(self, settings: MatchedRanksSettings, sets: Sets) -> dict[str, Any]:
        matched = sets.extra["matched"]
        return {
            "matched_edit": {
                "name": matched.name,
                "path": str(matched.path),
                "mode": matched.mode,
                "created": matched.meta.get("created"),
            },
            "seed": settings.seed,
        } | edit_kind_of_mode(matched.mode).control_meta(matched.meta)


def random_ranks(
    keys: list[str], shapes: dict[str, tuple[int, int]], ranks: dict[str, int], seed: int
) -> EditContent:
    """Per module Q, random orthonormal [d_out, r] with r its entry in `ranks`, drawn module by
    module from one seeded generator (a search's control and `prune --match-ranks` alike);
    W ← (I − Q Qᵀ) W removes as much rank in directions chosen without data."""
    from wandacli.removal.ranks import random_orthonormal

    generator = torch.Generator().manual_seed(seed)
    modules = []
    for key in keys:
        if ranks.get(key, 0) == 0:
            continue
        basis = random_orthonormal(shapes[key][0], ranks[key], generator)
        modules.append(
            EditModule(
                key,
                {"remove": basis.float().numpy()},
                removed_rank=ranks[key],
                full_rank=min(shapes[key]),
                ranks={"remove": ranks[key]},
            )
        )
    return EditContent("random-ranks", modules, remove_random_ranks)


def remove_random_ranks(
    weight: torch.Tensor, bases: dict[str, torch.Tensor], scale: float = 1.0
) -> torch.Tensor:
    """(I − Q Qᵀ) W: the random directions removed."""
    from wandacli.removal.ranks import in_float64, remove_top_ranks

    w, as64 = in_float64(weight, bases)
    return remove_top_ranks(w, as64["remove"])


KIND = MatchedRanks()
