"""What the rank edits (ActSVD's removal of ranks and the orthogonal projection) share: rank
statistics read, ranks checked against each module, bases from one exact eigendecomposition
of W C Wᵀ per module, the reference's sequential order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from wandacli.core.errors import ConfigError
from wandacli.removal.content import EditContent, EditModule, EditShape
from wandacli.removal.kinds.base import EditKind, Sets, closing_on_error, same_model
from wandacli.store.schema import split_key

EIGENSOLVER = "torch.linalg.eigh, float64, of W C Wᵀ (or its d_in-sized form)"


class RankEditKind(EditKind):
    """A rank edit computed from rank statistics and the model's weights."""

    reads_weights: ClassVar[bool] = True
    does = "edits ranks"
    # The flag that sets each basis's rank, for the one-line error of a rank out of range.
    rank_flags: ClassVar[dict[str, str]] = {}

    def ranks_for(self, settings: Any, shape: tuple[int, int]) -> dict[str, int]:
        """The rank of each basis for a module of `shape` [d_out, d_in]."""
        raise NotImplementedError

    def flag_for(self, settings: Any, role: str) -> str:
        return self.rank_flags[role]

    def removed_rank(self, ranks: dict[str, int], full: int, bases: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def secondary(self, settings: Any) -> str | None:
        return None

    def open(self, request: Any, root: Path) -> Sets:
        from wandacli.removal.selection import selected_keys
        from wandacli.store.files import open_rank_statistics

        with closing_on_error() as stack:
            primary = stack.enter_context(open_rank_statistics(request.scores, root))
            other = None
            second = self.secondary(request.settings)
            if second is not None:
                other = stack.enter_context(open_rank_statistics(second, root))
                same_model(
                    primary,
                    other,
                    "--scores",
                    "--utility-scores",
                    f"--scores {request.scores} and --utility-scores {second} were computed on "
                    "different models",
                )
            keys = selected_keys(request, primary.fingerprint)
            return Sets(primary, other, keys, root, stack)

    def check_sets(self, settings: Any, sets: Sets, request: Any) -> None:
        """Every rank within [0, min(d_out, d_in)] of its module, before anything is loaded;
        the model asked for once the sets are known to be rank statistics (a wanda set given
        by mistake is named as such first)."""
        if request.model is None:
            raise ConfigError(
                "a rank edit needs the weights (it projects W): pass --model, the model the "
                "rank statistics were computed on"
            )
        modules_filter = request.modules
        shapes = sets.fingerprint.shapes
        for key in sets.keys:
            limit = min(shapes[key])
            for role, rank in self.ranks_for(settings, shapes[key]).items():
                if not 0 <= rank <= limit:
                    layer, module = split_key(key)
                    raise ConfigError(
                        f"{self.flag_for(settings, role)} gives layer {layer} {module} a rank of "
                        f"{rank}, outside [0, {limit}] (its weight is {shapes[key][0]}×"
                        f"{shapes[key][1]}): choose a rank within it"
                        + (" or filter modules with --modules" if modules_filter is None else "")
                    )

    def stored_bytes(self, settings: Any, sets: Sets) -> int:
        shapes = sets.fingerprint.shapes
        return sum(
            shapes[k][0] * sum(self.ranks_for(settings, shapes[k]).values()) * 4 for k in sets.keys
        )

    def content(self, settings: Any, sets: Sets, loaded: Any, reporter: Any) -> EditContent:
        return EditContent(
            self.name_of_mode(settings),
            self._modules(settings, sets, loaded, reporter),
            self.edited_weight,
            applied=bool(settings.sequential),
        )

    def name_of_mode(self, settings: Any) -> str:
        return self.name

    def _modules(
        self, settings: Any, sets: Sets, loaded: Any, reporter: Any
    ) -> Iterator[EditModule]:
        """Per module: the bases from an exact float64 eigendecomposition of W C Wᵀ, on the
        weight's device (the GPU when there is one), rounded to float32 as the file stores
        them; in the sequential order, each layer edited before the next is recorded."""
        from wandacli.removal.ranks import top_output_directions
        from wandacli.removal.sequential import SequentialMoments

        by_key = {lin.key: lin for lin in loaded.linear_layers}
        shapes = sets.fingerprint.shapes
        sequential = (
            SequentialMoments(loaded, sets.primary, sets.secondary) if settings.sequential else None
        )
        mode = self.name_of_mode(settings)
        reporter.start(f"edit: {mode}", total=len(sets.keys))
        for key in sets.keys:
            w64 = by_key[key].weight_matrix().detach().to(torch.float64)
            ranks = self.ranks_for(settings, shapes[key])
            bases: dict[str, torch.Tensor] = {}
            for role, rank in ranks.items():
                source = sets.secondary if role == "utility" else sets.primary
                assert source is not None
                if sequential is not None:  # recorded now, after the earlier layers' edits
                    moment = sequential.second_moment(source, key).to(w64.device)
                else:
                    moment = torch.from_numpy(source.read(key)).to(w64.device)
                bases[role] = top_output_directions(w64, moment, rank)
            if sequential is not None:  # this layer's edit in place before the next is recorded
                sequential.apply(by_key[key], self, bases)
            full = min(shapes[key])
            yield EditModule(
                key,
                {role: basis.float().cpu().numpy() for role, basis in bases.items()},
                removed_rank=self.removed_rank(ranks, full, bases),
                full_rank=full,
                ranks=ranks,
            )
            reporter.advance()
        reporter.finish()

    def stored_meta(self, settings: Any, sets: Sets) -> dict[str, Any]:
        return {
            "rank_statistics": [
                describe_statistics(sets.primary, "safety" if sets.secondary else "statistics"),
                *([describe_statistics(sets.secondary, "utility")] if sets.secondary else []),
            ],
            "eigensolver": EIGENSOLVER,
            "order": "sequential" if settings.sequential else "store",
        }

    def control_meta(self, matched_meta: dict[str, Any]) -> dict[str, Any]:
        return control_rule()

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
        """The random control of such an edit: the same rank per module, in random
        directions."""
        from wandacli.removal.kinds.matched_ranks import random_ranks

        return random_ranks(list(removed), shapes, removed, seed)


def control_rule() -> dict[str, Any]:
    from wandacli.removal.kinds.matched_ranks import RANKS_RULE

    return {"rule": RANKS_RULE}


def describe_statistics(statistics: Any, role: str) -> dict[str, Any]:
    return {
        "role": role,
        "name": statistics.name,
        "path": str(statistics.path),
        "method": statistics.meta.get("method"),
        "data": (statistics.meta.get("data") or {}).get("name"),
        "counted_tokens": statistics.counted_tokens,
        "finished": statistics.meta.get("finished"),
    }
