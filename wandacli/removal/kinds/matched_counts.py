"""The control of a mask: in every matrix as many weights as a given mask prunes, chosen by
another score set (`--match-counts MASK`; with a random score set, the control of the same
size and layout). A search's control of a mask is drawn the same way, uniformly per matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wandacli.config.declare import option
from wandacli.core.errors import StoreError
from wandacli.core.naming import file_safe_name
from wandacli.removal.content import MaskContent
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import MaskKind, Sets, name_suffix, open_score_sets
from wandacli.removal.masks import count_mask


@dataclass(frozen=True)
class MatchedCountsSettings:
    match_counts: str | None = option(
        None,
        "--match-counts",
        help="Prune, in every matrix, as many weights as this mask does (name or .h5), "
        "chosen by --scores: with a random score set, the control of the same size and "
        "layout as a set difference.",
    )
    prune_highest: bool = options.prune_highest()


class MatchedCounts(MaskKind):
    name = "matched-counts"
    title = "a mask of matched counts"
    selector = "--match-counts"
    does = "prunes as many weights per matrix as another mask"
    alongside = "with --match-counts (the mask given sets how many weights each matrix prunes)"
    settings = MatchedCountsSettings

    def claims(self, given: dict[str, Any]) -> bool:
        return "match_counts" in given

    def open(self, request: Any, root: Path) -> Sets:
        from wandacli.store.files import open_mask

        sets = open_score_sets(request, root, None)
        try:
            matched = sets.stack.enter_context(open_mask(request.settings.match_counts, root))
            mismatch = sets.fingerprint.first_mismatch(
                matched.fingerprint, mine="scores", theirs="--match-counts mask"
            )
            if mismatch:
                raise StoreError(
                    f"--match-counts {request.settings.match_counts} was made for another "
                    f"model: {mismatch}"
                )
        except BaseException:
            sets.close()
            raise
        sets.extra["matched"] = matched
        return sets

    def default_name(self, request: Any, sets: Sets) -> str:
        name = f"{sets.primary.name}.as-{Path(str(request.settings.match_counts)).stem}"
        if request.settings.prune_highest:
            name += ".top"
        return file_safe_name(name + name_suffix(request))

    def mask(
        self, settings: MatchedCountsSettings, sets: Sets, rankings: Any, key: str
    ) -> np.ndarray:
        count = int(sets.extra["matched"].read(key).sum())
        return count_mask(sets.primary.read(key), count, prune_highest=settings.prune_highest)

    def remade(self, meta: dict[str, Any], sets: Sets) -> list[str]:
        matched = sets.extra["matched"]
        if (meta.get("matched_mask") or {}).get("created") != matched.meta.get("created"):
            return [f"--match-counts mask {matched.name!r} was remade after this mask"]
        return []

    def stored_meta(self, settings: MatchedCountsSettings, sets: Sets) -> dict[str, Any]:
        matched = sets.extra["matched"]
        return {
            "prune_highest": settings.prune_highest,
            "matched_mask": {
                "path": str(matched.path),
                "created": matched.meta.get("created"),
                "pruned": matched.meta.get("pruned"),
            },
        }


def random_entries(
    keys: list[str], shapes: dict[str, tuple[int, int]], counts: dict[str, int], seed: int
) -> MaskContent:
    """A search's control of a mask: per matrix the same count of entries, chosen uniformly at
    random (one seeded generator, matrix by matrix in the store's order)."""
    rng = np.random.default_rng(seed)
    masks: dict[str, np.ndarray] = {}
    for key in keys:
        rows, cols = shapes[key]
        chosen = rng.choice(rows * cols, size=counts.get(key, 0), replace=False)
        mask = np.zeros(rows * cols, dtype=bool)
        mask[chosen] = True
        masks[key] = mask.reshape(rows, cols)
    return MaskContent(list(keys), masks.__getitem__)


KIND = MatchedCounts()
