"""The settings of `prune`: masks from score sets, rank edits from rank statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# prune


@dataclass(frozen=True)
class PruneConfig:
    """Everything `wandacli prune` needs. `scores` is the safety set in set-difference mode."""

    scores: str
    store: Path | None = None  # None: the store holding `scores`, else DEFAULT_STORE
    sparsity_ratio: float | None = None
    sparsity_type: str = "unstructured"
    prune_highest: bool = False
    variant: bool = False
    scope: str = "row"
    utility_scores: str | None = None
    p: float | None = None
    q: float | None = None
    match_counts: str | None = None  # a mask whose per-matrix counts this one copies
    layers: str | None = None
    modules: str | None = None
    name: str | None = None
    model: ModelSpec | None = None
    save_model: Path | None = None
    recover_from_base: str | None = None
    export_mask: Path | None = None
    overwrite: bool = False
    # Set by `search --keep`: the search and trial that chose these parameters (bookkeeping).
    search: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from wandacli.config.settings import parse_nm

        if self.scope not in ("row", "matrix"):
            raise ConfigError(f"unknown --scope {self.scope!r}: use row or matrix")
        if self.set_difference:
            if self.p is None or self.q is None:
                raise ConfigError(
                    "--utility-scores needs --p and --q (the top fractions to compare)"
                )
            for flag, value in (("--p", self.p), ("--q", self.q)):
                if not 0 < value <= 1:
                    raise ConfigError(f"{flag} must be in (0, 1] (got {value})")
            self._refuse_ratio_flags(
                "to the set difference (--utility-scores with --p/--q chooses what is pruned)"
            )
        elif self.match_counts is not None:
            if self.p is not None or self.q is not None:
                raise ConfigError("--p and --q need --utility-scores (the set difference)")
            self._refuse_ratio_flags(
                "with --match-counts (the mask given sets how many weights each matrix prunes)"
            )
        else:
            if self.p is not None or self.q is not None:
                raise ConfigError("--p and --q need --utility-scores (the set difference)")
            try:
                nm = parse_nm(self.sparsity_type)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if nm is not None:
                n, m = nm
                if self.sparsity_ratio is not None and abs(self.sparsity_ratio - n / m) > 1e-9:
                    raise ConfigError(
                        f"--sparsity-type {n}:{m} prunes {n / m:g} of the weights; "
                        f"--sparsity-ratio {self.sparsity_ratio:g} contradicts it: drop it"
                    )
                if self.variant or self.scope != "row":
                    raise ConfigError(
                        f"--sparsity-type {n}:{m} cannot be combined with --variant or --scope matrix"
                    )
            else:
                if self.sparsity_ratio is None:
                    raise ConfigError(
                        "--sparsity-ratio is required (e.g. 0.5), or use --sparsity-type N:M or --utility-scores"
                    )
                if not 0 <= self.sparsity_ratio < 1:
                    raise ConfigError(
                        f"--sparsity-ratio must be in [0, 1) (got {self.sparsity_ratio})"
                    )
            if self.variant and self.scope != "row":
                raise ConfigError("--variant ranks rows: it cannot be combined with --scope matrix")
        if self.save_model is not None and self.model is None:
            raise ConfigError("--save-model needs --model (the model the scores were computed on)")
        if self.recover_from_base is not None and self.save_model is None:
            raise ConfigError(
                "--recover-from-base only changes a saved model: add --save-model OUT"
            )

    def _refuse_ratio_flags(self, alongside: str) -> None:
        """The flags of ratio pruning, refused where something else chooses what is pruned."""
        for given, flag in (
            (self.sparsity_ratio is not None, "--sparsity-ratio"),
            (self.sparsity_type != "unstructured", "--sparsity-type"),
            (self.variant, "--variant"),
            (self.scope != "row", "--scope"),
        ):
            if given:
                raise ConfigError(f"{flag} does not apply {alongside}: drop one of them")

    @property
    def set_difference(self) -> bool:
        return self.utility_scores is not None

    @property
    def nm(self) -> tuple[int, int] | None:
        from wandacli.config.settings import parse_nm

        return None if self.set_difference else parse_nm(self.sparsity_type)

    @property
    def mode(self) -> str:
        if self.set_difference:
            return "set-difference"
        if self.match_counts is not None:
            return "matched-counts"
        if self.nm is not None:
            return "n:m"
        if self.variant:
            return "variant"
        return "matrix" if self.scope == "matrix" else "row"

    @property
    def effective_ratio(self) -> float | None:
        nm = self.nm
        return nm[0] / nm[1] if nm else self.sparsity_ratio

    def request(self) -> dict[str, Any]:
        """What decides the mask's bits (the outputs and the model they go to do not)."""
        return prune_request(self.to_json())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("store", "save_model", "export_mask"):
            data[key] = str(data[key]) if data[key] is not None else None
        if self.model is not None:
            data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        return data


_PRUNE_BOOKKEEPING = frozenset(
    {
        "store",
        "name",
        "overwrite",
        "model",
        "save_model",
        "export_mask",
        "recover_from_base",
        "search",
    }
)


def prune_request(config_json: dict[str, Any]) -> dict[str, Any]:
    """The request part of a PruneConfig's JSON (as stored in a mask's `meta.config`)."""
    return {k: v for k, v in config_json.items() if k not in _PRUNE_BOOKKEEPING}


# ---------------------------------------------------------------------------------------------
# prune, rank edits (ActSVD)


def check_direction_scale(scale: float, direction_layer: int | None) -> None:
    """α in (0, 1] (1 removes the direction, less removes part of it), and only for a
    direction: `prune` checks it before choosing between a mask and an edit."""
    if scale != 1.0 and direction_layer is None:
        raise ConfigError(
            "--direction-scale is the share of a refusal direction removed: give it with "
            "--direction-layer"
        )
    if not 0 < scale <= 1:
        raise ConfigError(
            f"--direction-scale {scale:g}: the share of the direction removed must lie in "
            "(0, 1] (1: all of it)"
        )


@dataclass(frozen=True)
class EditConfig:
    """`wandacli prune` on rank statistics: a rank edit into DIR/edits/.

    - remove_top_ranks R:  W ← (I − Π_R) W        (the reference's `--top_remove --rank R`)
    - keep_top_ranks K:    W ← Π_K W
    - orthogonal projection with `utility_scores`: W ← W − (I − Π_u) Π_s W, ranks given as
      safety_ranks/utility_ranks (r_s, r_u), or as the reference's rank_neg/rank_pos
      (r_s = min(d_out, d_in) − rank_neg, r_u = min(d_out, d_in) − rank_pos, per module).
    - match_ranks EDIT: the control of that edit, W ← (I − Q Qᵀ) W with Q random orthonormal
      (seeded) of the rank EDIT removes in each module. `scores` only names the model: the
      rank statistics are not read, and no weights are needed.
    """

    scores: str  # rank statistics (the safety set in the orthogonal projection)
    model: ModelSpec | None = None
    store: Path | None = None
    remove_top_ranks: int | None = None
    keep_top_ranks: int | None = None
    utility_scores: str | None = None
    safety_ranks: int | None = None
    utility_ranks: int | None = None
    rank_pos: int | None = None
    rank_neg: int | None = None
    layers: str | None = None
    modules: str | None = None
    name: str | None = None
    save_model: Path | None = None
    overwrite: bool = False
    # The reference's order: layer by layer, each layer's inputs recorded after the layers
    # before it were edited (recomputed from the model and the sets' recorded data).
    sequential: bool = False
    match_ranks: str | None = None  # an edit whose per-module removed rank the control copies
    # The refusal direction from two mean-activations sets (scores: harmful, utility_scores:
    # harmless): r at this residual stream and prompt position (−1: the last prompt token).
    direction_layer: int | None = None
    direction_position: int = -1
    # The share of the direction removed, heretic's weight of the abliteration: W ← W − α r rᵀ W
    # (1: orthogonalised; 0.5: the stream keeps half its component along r from each writer).
    direction_scale: float = 1.0
    seed: int = 0  # the control's random directions
    # Set by `search --keep`: the search and trial that chose these ranks (bookkeeping).
    search: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_direction_scale(self.direction_scale, self.direction_layer)
        if self.direction_layer is not None:
            self._check_direction()
            return
        modes = [
            self.remove_top_ranks is not None,
            self.keep_top_ranks is not None,
            self.utility_scores is not None,
            self.match_ranks is not None,
        ]
        direct = self.safety_ranks is not None or self.utility_ranks is not None
        reference = self.rank_pos is not None or self.rank_neg is not None
        if self.utility_scores is None and (direct or reference):
            raise ConfigError(
                "--safety-ranks/--utility-ranks and --rank-neg/--rank-pos need --utility-scores "
                "(the orthogonal projection)"
            )
        if sum(modes) != 1:
            raise ConfigError(
                "a rank edit is one of --remove-top-ranks R, --keep-top-ranks K, "
                "--utility-scores with --safety-ranks/--utility-ranks (or --rank-neg/--rank-pos), "
                "or the random control --match-ranks EDIT"
            )
        if self.match_ranks is not None and self.sequential:
            raise ConfigError(
                "--match-ranks draws random directions and reads no data: drop --sequential"
            )
        if self.utility_scores is not None:
            if direct and reference:
                raise ConfigError(
                    "give the projection's ranks once: --safety-ranks/--utility-ranks, or the "
                    "reference's --rank-neg/--rank-pos, not both"
                )
            if direct and (self.safety_ranks is None or self.utility_ranks is None):
                raise ConfigError(
                    "the orthogonal projection needs both --safety-ranks and --utility-ranks"
                )
            if reference and (self.rank_pos is None or self.rank_neg is None):
                raise ConfigError("the orthogonal projection needs both --rank-neg and --rank-pos")
            if not direct and not reference:
                raise ConfigError(
                    "the orthogonal projection needs its ranks: --safety-ranks RS --utility-ranks RU "
                    "(or the reference's --rank-neg/--rank-pos)"
                )
        for flag, value in (
            ("--remove-top-ranks", self.remove_top_ranks),
            ("--keep-top-ranks", self.keep_top_ranks),
            ("--safety-ranks", self.safety_ranks),
            ("--utility-ranks", self.utility_ranks),
            ("--rank-pos", self.rank_pos),
            ("--rank-neg", self.rank_neg),
        ):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} must be 0 or more (got {value})")
        if self.model is None and (self.match_ranks is None or self.save_model is not None):
            raise ConfigError(
                "a rank edit needs the weights (it projects W): pass --model, the model the "
                "rank statistics were computed on"
            )

    def _check_direction(self) -> None:
        others = [
            flag
            for flag, value in (
                ("--remove-top-ranks", self.remove_top_ranks),
                ("--keep-top-ranks", self.keep_top_ranks),
                ("--safety-ranks", self.safety_ranks),
                ("--utility-ranks", self.utility_ranks),
                ("--rank-neg", self.rank_neg),
                ("--rank-pos", self.rank_pos),
                ("--match-ranks", self.match_ranks),
            )
            if value is not None
        ]
        if others or self.sequential:
            raise ConfigError(
                f"--direction-layer removes one direction; {(others or ['--sequential'])[0]} "
                "edits ranks: drop one of them"
            )
        if self.utility_scores is None:
            raise ConfigError(
                "--direction-layer needs two mean-activations sets: --scores HARMFUL "
                "--utility-scores HARMLESS"
            )
        if self.save_model is not None and self.model is None:
            raise ConfigError("--save-model needs --model (the model the means were taken on)")

    @property
    def mode(self) -> str:
        if self.direction_layer is not None:
            return "direction"
        if self.remove_top_ranks is not None:
            return "remove-top-ranks"
        if self.keep_top_ranks is not None:
            return "keep-top-ranks"
        if self.match_ranks is not None:
            return "random-ranks"
        return "orthogonal-projection"

    def ranks_for(self, shape: tuple[int, int]) -> dict[str, int]:
        """The ranks of each basis for a module of `shape` [d_out, d_in] (a `--match-ranks`
        control takes them from the matched edit instead)."""
        assert self.match_ranks is None, "a control's ranks are the matched edit's"
        full = min(shape)
        if self.remove_top_ranks is not None:
            return {"remove": self.remove_top_ranks}
        if self.keep_top_ranks is not None:
            return {"keep": self.keep_top_ranks}
        if self.safety_ranks is not None and self.utility_ranks is not None:
            return {"safety": self.safety_ranks, "utility": self.utility_ranks}
        assert self.rank_neg is not None and self.rank_pos is not None
        return {"safety": full - self.rank_neg, "utility": full - self.rank_pos}

    def request(self) -> dict[str, Any]:
        """What decides the edit's numbers (outputs and bookkeeping excluded): the rank
        settings, and the weights it projects (the model and the dtype they are loaded in)."""
        data = self.to_json()
        request = {
            k: v
            for k, v in data.items()
            if k not in ("store", "name", "overwrite", "save_model", "model", "search")
        }
        model = data.get("model") or {}
        if self.mode not in ("direction", "random-ranks"):  # those never read the weights
            request["model"] = {"model": model.get("model"), "dtype": model.get("dtype")}
        if self.direction_scale == 1.0:  # as every edit made before the scale existed
            request.pop("direction_scale")
        return request

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("store", "save_model"):
            data[key] = str(data[key]) if data[key] is not None else None
        if self.model is not None:
            data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        return data


def refuse_mask_flags_for_edits(**given: Any) -> None:
    """Mask options given beside a rank flag: one line naming the first."""
    defaults = {
        "sparsity_type": "unstructured",
        "prune_highest": False,
        "variant": False,
        "scope": "row",
    }
    for option, value in given.items():
        if value is not None and value != defaults.get(option):
            flag = "--" + option.replace("_", "-")
            raise ConfigError(
                f"{flag} chooses weights for a mask; a rank edit (--remove-top-ranks, "
                "--keep-top-ranks, the orthogonal projection) removes ranks: drop one of them"
            )
