"""A stored removal (a mask, a rank edit or a refusal direction) read back and applied to a
model in memory: eval-attack, eval-utility and the saved models all open one with
`open_removal` and apply it with `.apply(loaded)`, through the same functions a search's trial
applies its removal with (removal/content.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wandacli.core.console import info
from wandacli.core.durable import save_model_directory
from wandacli.core.errors import StoreError
from wandacli.removal.content import EditContent, EditModule, MaskContent, apply_edit, apply_mask
from wandacli.removal.in_memory import WeightChanges
from wandacli.removal.kinds.base import edit_kind_of_mode
from wandacli.store.files import EditFile, MaskFile, open_stored_removal
from wandacli.store.schema import DIRECTION_DATASET


class Removal:
    """A stored mask or edit, open for reading."""

    kind: str  # "mask" or "edit"
    path: Path
    meta: dict[str, Any]

    def apply(self, loaded: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Removal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MaskRemoval(Removal):
    kind = "mask"

    def __init__(self, mask: MaskFile) -> None:
        self.file = mask
        self.path = mask.path
        self.meta = dict(mask.meta)

    def content(self) -> MaskContent:
        return MaskContent(self.file.keys, self.file.read)

    def apply(self, loaded: Any) -> None:
        """Zero the masked weights, one matrix at a time, after checking the mask was made for
        this model."""
        self.file.check_model(loaded.fingerprint, loaded.model_id)
        apply_mask(self.content(), WeightChanges(loaded, undo=False))

    def close(self) -> None:
        self.file.close()


class EditRemoval(Removal):
    kind = "edit"

    def __init__(self, edit: EditFile) -> None:
        self.file = edit
        self.path = edit.path
        self.meta = dict(edit.meta)

    def content(self) -> EditContent:
        """The edit as `prune` held it before writing it: each module's bases read as it is
        applied, r for the embedding where the edit removes a direction."""
        kind = edit_kind_of_mode(self.file.mode)
        shape = kind.stored_shape(self.meta)
        modules = (
            EditModule(key, self.file.bases(key), scale=shape.module_scale(key))
            for key in self.file.keys
        )
        # A direction edit records whether the embedding lost r (`embedding`); r is at
        # /direction either way. Rank edits record neither.
        direction = self.file.read_raw(DIRECTION_DATASET) if "embedding" in self.meta else None
        return EditContent(
            self.file.mode,
            modules,
            kind.edited_weight,
            direction=direction,
            writers=self.meta.get("writers"),
            **shape.content_fields(),
        )

    def apply(self, loaded: Any) -> None:
        """W ← the edited weight, module by module, in float64 on the weight's device."""
        self.file.check_model(loaded.fingerprint, loaded.model_id)
        for _ in apply_edit(self.content(), WeightChanges(loaded, undo=False)):
            pass

    def close(self) -> None:
        self.file.close()


def open_removal(reference: str, store_root: Path | None) -> Removal:
    """A mask or an edit, by path (its format decides) or by name (masks/, then edits/)."""
    stored = open_stored_removal(reference, store_root)
    return EditRemoval(stored) if isinstance(stored, EditFile) else MaskRemoval(stored)


# Beside a saved model: the meta of the mask or edit it was made with (its name predates edits).
PROVENANCE_NAME = "wandacli-mask.json"
DENSE_MODEL_KEY = "dense_model"  # in the provenance: the model the save was made from
FINETUNE_KEY = "finetune"  # in a `finetune` save's provenance: the attack, its mask and step


def read_provenance(directory: Path) -> dict[str, Any] | None:
    """The removal a saved model was made with, as `save_model_with` recorded it."""
    try:
        found = json.loads((directory / PROVENANCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def check_save_model_target(out: Path, replace: bool) -> None:
    """`--save-model OUT`, refused before any work: a file, or a directory with something in it
    (unless replacing), or a parent that cannot be written."""
    from wandacli.core.durable import ensure_writable_directory
    from wandacli.core.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--save-model {out} is a file: pass a directory to create")
    if out.exists() and any(out.iterdir()) and not replace:
        raise ConfigError(f"--save-model {out} already exists: pass --overwrite to replace it")
    ensure_writable_directory(out.parent, "--save-model")


def save_model_with(
    loaded: Any,
    out: Path,
    source: Path,
    meta: dict[str, Any],
    command_line: list[str],
    reporter: Any,
    *,
    what: str,
) -> Path:
    """Save a model with a mask or edit applied: save_pretrained into a temporary directory
    renamed into place (an interrupted save never leaves a half-written model at OUT), with
    the mask's or edit's meta beside it so that eval commands know what the model is."""
    import shlex

    from wandacli.core.errors import interruptible

    reporter.start("saving model", total=1)
    kept = f"while saving the model: {out} is unchanged; the {what} {source} is kept"
    provenance = {k: v for k, v in meta.items() if k != "model"}  # the model is the save itself
    # ...made from this dense model, which measures the saved model's word salad.
    provenance[DENSE_MODEL_KEY] = (meta.get("model") or {}).get("id")
    provenance[f"{what}_file"] = str(source)
    provenance["saved_by"] = shlex.join(command_line)

    def write_provenance(tmp: Path) -> None:
        (tmp / PROVENANCE_NAME).write_text(
            json.dumps(provenance, indent=1, default=str), encoding="utf-8"
        )

    try:
        with interruptible(lambda: kept):
            save_model_directory(loaded.model, loaded.tokenizer, out, write_provenance)
    except OSError as exc:
        raise StoreError(f"cannot save the model to {out}: {exc.strerror or exc}") from exc
    reporter.advance()
    reporter.finish()
    info(f"saved the {'pruned' if what == 'mask' else 'edited'} model to {out}")
    return out
