"""A removal in memory, and the one way it is applied to a model.

Whoever builds a removal (a search's trial, `prune` before it writes the file, evaluation after
it reads one back) holds it in one of these forms, and `apply` changes the model's weights from
it the same way for all of them, so that a trial, the file `prune` writes for the same
parameters and the model evaluated from that file are one removal:

    MaskContent   per module, the entries to zero (bool [out, in], True = pruned)
    EditContent   per module, the orthonormal bases of a rank edit, rounded to float32 as the
                  file stores them (and, for a refusal direction, r for the token embedding
                  too), computed module by module as they are read, so that `prune` streams
                  them to the file without holding the whole edit

The weights change through `WeightChanges` (removal/in_memory.py): undone exactly after a trial,
kept for evaluation and saved models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wandacli.removal.in_memory import WeightChanges, writer_norm_scale


@dataclass
class MaskContent:
    """A mask: `mask(key)` for every module in `keys` (the others are left as they are)."""

    keys: list[str]
    mask: Callable[[str], np.ndarray]


@dataclass
class EditModule:
    """One module of an edit: its bases by role (float32 [d_out, r]), or, where a kind computes
    the change directly, ΔW (float32 [d_out, d_in]; W ← W − ΔW)."""

    key: str
    bases: dict[str, np.ndarray] = field(default_factory=dict)
    removed_rank: int = 0
    full_rank: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    delta: torch.Tensor | None = None
    # This module's share of the edit where it has its own (a direction's per-layer weights,
    # removal/layer_weights.py); None: the content's `scale`.
    scale: float | None = None


# A kind's edit formula: a module's weight, its bases and the share removed → the edited weight
# in float64 (removal/kinds/: each edit kind's `edited_weight`).
Formula = Callable[[torch.Tensor, dict[str, torch.Tensor], float], torch.Tensor]


ROW_NORMS = 2  # --norm-preserving 2: heretic's rows (`_formula`)


@dataclass(frozen=True)
class EditShape:
    """How an edit is applied beyond its bases: the share removed (per module where the edit
    weighs its modules apart), whether the columns keep their norms, whether the embedding
    loses the direction. What a stored file records and its random control matches."""

    scale: float = 1.0
    norm_preserving: int = 0  # 0: no; 1: columns; 2: rows (heretic's), as `_formula` says
    embedding: bool = True
    module_scales: dict[str, float] | None = None

    def module_scale(self, key: str) -> float | None:
        """A module's own share (None: the edit's `scale`)."""
        return (self.module_scales or {}).get(key)

    def content_fields(self) -> dict[str, Any]:
        """The EditContent fields this shape sets (its modules take `module_scale`)."""
        return {
            "scale": self.scale,
            "norm_preserving": self.norm_preserving,
            "embedding": self.embedding,
        }


@dataclass
class EditContent:
    """A rank edit or a refusal direction: `modules` yields each changed module in the store's
    order, computing it as it is read; `formula` is its kind's."""

    mode: str
    modules: Iterable[EditModule]
    formula: Formula
    # r [d_model, 1] float32: the token embedding loses it too (a tied output head with it),
    # and every module's `remove` basis is this vector.
    direction: np.ndarray | None = None
    scale: float = 1.0  # the share of the direction removed (1 for every other edit)
    # Per writer, what a direction does to it (families/base.py `writer_treatment`): made
    # orthogonal to r or to normalise(g ⊙ r) behind a norm, its bias projected. None in
    # direction edits made before it was recorded: r removed from the weights alone.
    writers: dict[str, dict[str, Any]] | None = None
    # Norm-preserving (a direction's `--norm-preserving`): 1, after the edit, each writer
    # column and each embedding row rescaled to its norm before it (removal/direction.py
    # `with_norms_of`); 2, heretic's rows (`_formula`); computed exactly from the weights as
    # they are applied.
    norm_preserving: int = 0
    # Whether the token embedding loses the direction too (Arditi et al.; heretic never edits
    # it).
    embedding: bool = True
    # The model was edited as the modules were computed (the reference's sequential order).
    applied: bool = False

    def shape(self, module_scales: dict[str, float]) -> EditShape:
        """How this edit was applied, with the modules' own shares as they were applied."""
        return EditShape(self.scale, self.norm_preserving, self.embedding, module_scales or None)


def apply_mask(
    content: MaskContent, changes: WeightChanges, base: Any | None = None
) -> dict[str, int]:
    """Zero each module's masked entries (or, with `base`, put the base model's weights there:
    `--recover-from-base`); how many per module."""
    base_layers = {lin.key: lin for lin in base.linear_layers} if base is not None else {}
    return {
        key: apply_module_mask(changes, key, content.mask(key), base_layers.get(key))
        for key in content.keys
    }


def apply_module_mask(
    changes: WeightChanges, key: str, mask: np.ndarray, base_layer: Any | None = None
) -> int:
    """One module's mask applied: its entries zeroed, or taken from the base model's layer."""
    if base_layer is not None:
        return changes.copy_from(key, mask, base_layer.weight_matrix())
    return changes.zero(key, mask)


def edited_module_weight(
    weight: torch.Tensor, content: EditContent, module: EditModule
) -> torch.Tensor:
    """One module's weight after the edit, in float64 by the content's formula (ΔW subtracted
    in float32 where a kind gives ΔW)."""
    if module.delta is not None:
        return weight.detach().float() - module.delta.to(weight.device)
    bases = {role: torch.from_numpy(basis) for role, basis in module.bases.items()}
    return _formula(content, module, weight.detach(), bases)


def module_scale(content: EditContent, module: EditModule) -> float:
    """The share of the edit removed from this module: its own, else the content's."""
    return content.scale if module.scale is None else module.scale


def _formula(
    content: EditContent,
    module: EditModule,
    weight: torch.Tensor,
    bases: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The content's formula on one module's weight at its share; where the content
    preserves norms, its columns rescaled to their norms before it (1), or (2, heretic's
    magnitude-preserving ablation) the formula applied to the weight with unit rows, whose
    rows are then scaled back to the norms they had."""
    from wandacli.removal.direction import with_norms_of

    scale = module_scale(content, module)
    if content.norm_preserving == ROW_NORMS:
        w = weight.detach().to(torch.float64)
        norms = w.norm(dim=1, keepdim=True)
        unit_rows = torch.where(norms > 0, w / norms.clamp_min(1e-300), w)
        return with_norms_of(content.formula(unit_rows, bases, scale), w, dim=1)
    edited = content.formula(weight, bases, scale)
    return with_norms_of(edited, weight, dim=0) if content.norm_preserving else edited


def apply_edit(content: EditContent, changes: WeightChanges) -> Iterator[EditModule]:
    """Change each module's weight as the edit says (and the embedding, for a direction),
    yielding each module once applied, for whoever also writes or counts them."""
    from wandacli.removal.direction import orthogonalised_embedding, orthonormal

    for module in content.modules:
        if not content.applied:
            treatment = (content.writers or {}).get(module.key)
            if treatment is not None and content.direction is not None:
                _remove_from_writer(content, module, treatment, changes)
            else:
                weight = changes.layers[module.key].weight_matrix()
                changes.replace(module.key, edited_module_weight(weight, content, module))
        yield module
    if content.direction is not None and content.embedding and not content.applied:
        r = orthonormal(torch.from_numpy(content.direction))
        changes.replace_embedding(
            orthogonalised_embedding(
                changes.embedding,
                r,
                content.scale,
                norm_preserving=bool(content.norm_preserving),
            )
        )


def _remove_from_writer(
    content: EditContent, module: EditModule, treatment: dict[str, Any], changes: WeightChanges
) -> None:
    """A direction removed from one writer as its treatment says: the weight (and its bias)
    made orthogonal to the writer's direction (r, or its own where the direction is
    biprojected), or to normalise(g ⊙ r) where a norm with scale g follows it."""
    from wandacli.removal.direction import projected_bias, writer_direction

    lin = changes.layers[module.key]
    norm_scale = writer_norm_scale(changes.model, lin.layer, treatment)
    u = writer_direction(torch.from_numpy(module.bases["remove"]), norm_scale)
    if u is None:
        return
    bases = {"remove": u}
    changes.replace(module.key, _formula(content, module, lin.weight_matrix().detach(), bases))
    if lin.bias is not None and treatment.get("bias", "none") != "none":
        changes.replace_bias(module.key, projected_bias(lin.bias, u, module_scale(content, module)))


def removed_rank_fraction(removed: dict[str, int], shapes: dict[str, tuple[int, int]]) -> float:
    """The rank an edit removes over every module's full rank (all modules, changed or not)."""
    total_rank = sum(min(shape) for shape in shapes.values())
    return sum(removed.values()) / total_rank if total_rank else 0.0
