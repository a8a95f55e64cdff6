"""The model under test for the eval commands: loaded through the shared loader, a stored mask
or rank edit optionally applied in memory (no edited copy on disk), and named as the
reference's results log names it (`method  actual_sparsity  [p  q]  metric  score`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.config.evaluation import results_root
from wandacli.config.settings import ModelSpec
from wandacli.core.console import warn
from wandacli.core.errors import StoreError
from wandacli.core.naming import file_safe_name
from wandacli.removal.apply import FINETUNE_KEY, PROVENANCE_NAME, open_removal
from wandacli.removal.kinds import kind_of_mode


@dataclass
class ModelUnderTest:
    loaded: Any  # LoadedModel
    removal_path: Path | None = None  # the mask or edit applied
    removal_meta: dict[str, Any] = field(default_factory=dict)
    actual_sparsity: float = 0.0  # exact zeros in the decoder's linear weights
    transferred_from: str | None = None  # --allow-other-model: the model the removal was made on

    def release(self) -> None:
        """Let the model's weights go (its id and tokenizer stay), so that another model fits
        where it was: the dense model that flags word salad, after generation."""
        import gc

        import torch

        self.loaded.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def is_edit(self) -> bool:
        """An edit (a rank edit or a direction: its meta's mode is an edit kind's), not a mask."""
        mode = self.removal_meta.get("mode")
        return mode is not None and kind_of_mode(str(mode)).family == "edit"

    @property
    def label(self) -> str:
        """A short name for result folders: the mask's name, else the model's."""
        if self.removal_path is not None:
            return self.removal_path.stem
        return Path(str(self.loaded.model_id)).name or "model"

    def default_out(self, store: Path | None) -> Path:
        """The results folder eval-attack and eval-utility both write when no --out is given:
        one folder per model under test, so that `report` shows it as one row, beside the
        store when there is one."""
        return results_root(store) / file_safe_name(self.label, fallback="model")

    @property
    def method(self) -> str:
        """The reference's `prune_method` for this model: `wanda`, `wandg`,
        `wandg_set_difference`, ..., or `dense`."""
        attack = self.removal_meta.get(FINETUNE_KEY)
        if attack:  # a model `finetune` saved: the attack's mode
            return f"finetune-{attack.get('mode')}"
        mode = self.removal_meta.get("mode")
        if not self.removal_meta or mode is None:
            return "dense"
        return kind_of_mode(str(mode)).reference_method(self.removal_meta)

    @property
    def p_q(self) -> tuple[float, float] | None:
        p, q = self.removal_meta.get("p"), self.removal_meta.get("q")
        return (float(p), float(q)) if p is not None and q is not None else None

    @property
    def matches(self) -> str | None:
        """For a control made with `prune --match-counts`: the name of the mask it matches."""
        matched = self.removal_meta.get("matched_mask") or {}
        return Path(str(matched["path"])).stem if matched.get("path") else None

    def describe(self) -> dict[str, Any]:
        described = {
            "model": self.loaded.model_id,
            "mask": str(self.removal_path) if self.removal_path else None,
            "method": self.method,
            "actual_sparsity": self.actual_sparsity,
            "p_q": self.p_q,
            "matches": self.matches,
        }
        if self.transferred_from is not None:
            described["removal_made_on"] = self.transferred_from
        origin = self.removal_meta.get("search")
        if origin:  # chosen by `search`: on which prompts (report says so beside the ASR's)
            prompts = origin.get("prompts") or {}
            described["search"] = {
                "name": origin.get("name"),
                "trial": origin.get("trial"),
                "prompts": {k: prompts.get(k) for k in ("name", "offset", "count")},
            }
        if self.removal_meta.get(FINETUNE_KEY):  # the attack, its mask and its step
            described["finetune"] = self.removal_meta[FINETUNE_KEY]
        if self.is_edit:  # the share of rank an edit removes, as the paper reports it
            described["removed_rank_fraction"] = self.removal_meta.get("removed_rank_fraction")
        return described


def load_model_under_test(
    spec: ModelSpec,
    mask: str | None,
    store: Path | None,
    before_removal: Callable[[Any], None] | None = None,
    *,
    allow_other_model: bool = False,
) -> ModelUnderTest:
    """Load the model; with a mask, zero its masked weights in memory. A directory saved by
    `prune --save-model` carries its mask's settings in wandacli-mask.json. `before_removal`
    sees the loaded model while it is still dense (the KL cost's reference is taken there)."""
    from wandacli.models.loader import load_model
    from wandacli.removal.masks import zero_fraction

    removal = open_removal(mask, store) if mask is not None else None  # fail fast, before loading
    try:
        loaded = load_model(spec)
        under_test = ModelUnderTest(loaded)
        if before_removal is not None:
            before_removal(loaded)
        if removal is not None:
            made_on = (removal.meta.get("model") or {}).get("id")
            if made_on and made_on != loaded.model_id:
                if not allow_other_model:
                    raise StoreError(
                        f"{removal.kind} {removal.path} was made on {made_on}, not "
                        f"{loaded.model_id} (the same shapes, other weights): pass "
                        "--allow-other-model to apply it anyway, or the --model it was made on"
                    )
                warn(f"applying {removal.path.name}, made on {made_on}, to {loaded.model_id}")
                under_test.transferred_from = made_on
            removal.apply(loaded)
            under_test.removal_path = removal.path
            under_test.removal_meta = dict(removal.meta)
        else:
            provenance = Path(loaded.source.location) / PROVENANCE_NAME
            if loaded.source.kind == "local" and provenance.is_file():
                under_test.removal_meta = json.loads(provenance.read_text(encoding="utf-8"))
        under_test.actual_sparsity = zero_fraction(loaded)
        return under_test
    finally:
        if removal is not None:
            removal.close()


def append_reference_log(path: Path, under_test: ModelUnderTest, metric: str, score: float) -> None:
    """One line of the reference's tab-separated results log, with its header when new."""
    p_q = under_test.p_q
    if not path.exists():
        header = (
            "method\tactual_sparsity\tp\tq\tmetric\tscore"
            if p_q
            else "method\tactual_sparsity\tmetric\tscore"
        )
        path.write_text(header + "\n", encoding="utf-8")
    columns = [under_test.method, f"{under_test.actual_sparsity:.6f}"]
    if p_q:
        columns += [f"{p_q[0]}", f"{p_q[1]}"]
    columns += [metric, f"{score:.4f}"]
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\t".join(columns) + "\n")
