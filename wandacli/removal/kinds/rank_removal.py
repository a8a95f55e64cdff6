"""ActSVD's rank removal (the reference's `--top_remove --rank R`): the top R output
directions of each module removed, W ← (I − Π_R) W, or only the top K kept, W ← Π_K W."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wandacli.core.errors import ConfigError
from wandacli.core.naming import file_safe_name
from wandacli.removal.kinds import options
from wandacli.removal.kinds.base import Sets, name_suffix
from wandacli.removal.kinds.rank_base import RankEditKind


@dataclass(frozen=True)
class RankRemovalSettings:
    remove_top_ranks: int | None = options.rank(
        "--remove-top-ranks",
        "Rank edit from actsvd statistics: W ← (I − Π_R) W, the top R output directions "
        "removed (the reference's --top_remove --rank R).",
    )
    keep_top_ranks: int | None = options.rank(
        "--keep-top-ranks", "Rank edit: W ← Π_K W, only the top K output directions kept."
    )
    sequential: bool = options.sequential()


ONE_OF = (
    "a rank edit is one of --remove-top-ranks R, --keep-top-ranks K, --utility-scores with "
    "--safety-ranks/--utility-ranks (or --rank-neg/--rank-pos), or the random control "
    "--match-ranks EDIT"
)


class RankRemoval(RankEditKind):
    name = "rank-removal"
    title = "a rank edit"
    selector = "--remove-top-ranks or --keep-top-ranks"
    settings = RankRemovalSettings
    modes = ("remove-top-ranks", "keep-top-ranks")
    rank_flags = {"remove": "--remove-top-ranks", "keep": "--keep-top-ranks"}

    def reference_method(self, meta: dict[str, Any]) -> str:
        return "actsvd_remove_top" if meta.get("mode") == "remove-top-ranks" else "actsvd_keep_top"

    def claims(self, given: dict[str, Any]) -> bool:
        return bool({"remove_top_ranks", "keep_top_ranks"} & set(given))

    def check(self, settings: RankRemovalSettings, request: Any) -> None:
        if (settings.remove_top_ranks is None) == (settings.keep_top_ranks is None):
            raise ConfigError(ONE_OF)
        super().check(settings, request)

    def name_of_mode(self, settings: RankRemovalSettings) -> str:
        return "remove-top-ranks" if settings.remove_top_ranks is not None else "keep-top-ranks"

    def ranks_for(self, settings: RankRemovalSettings, shape: tuple[int, int]) -> dict[str, int]:
        if settings.remove_top_ranks is not None:
            return {"remove": settings.remove_top_ranks}
        assert settings.keep_top_ranks is not None
        return {"keep": settings.keep_top_ranks}

    def edited_weight(
        self, weight: torch.Tensor, bases: dict[str, torch.Tensor], scale: float = 1.0
    ) -> torch.Tensor:
        """(I − Π_R) W with basis `remove`; Π_K W with basis `keep`."""
        from wandacli.removal.ranks import in_float64, keep_top_ranks, remove_top_ranks

        w, as64 = in_float64(weight, bases)
        if "remove" in as64:
            return remove_top_ranks(w, as64["remove"])
        return keep_top_ranks(w, as64["keep"])

    def removed_rank(self, ranks: dict[str, int], full: int, bases: dict[str, torch.Tensor]) -> int:
        return ranks["remove"] if "remove" in ranks else full - ranks["keep"]

    def default_name(self, request: Any, sets: Sets) -> str:
        settings = request.settings
        if settings.remove_top_ranks is not None:
            name = f"{sets.primary.name}.remove-top{settings.remove_top_ranks}"
        else:
            name = f"{sets.primary.name}.keep-top{settings.keep_top_ranks}"
        name += name_suffix(request)
        if settings.sequential:
            name += ".seq"
        return file_safe_name(name)


KIND = RankRemoval()
