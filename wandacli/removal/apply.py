"""What to remove from a model, applied in memory: a mask (weights set to zero, `prune`) or a
rank edit (ranks subtracted, `prune --remove-top-ranks` and friends). eval-attack, eval-utility
and the saved models all open one with `open_removal` and apply it with `.apply(loaded)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wandacli.core.console import info
from wandacli.core.durable import save_model_directory
from wandacli.core.errors import StoreError
from wandacli.store.files import EditFile, MaskFile, resolve_file, stored_format
from wandacli.store.schema import DIRECTION_DATASET, EDIT_FORMAT, Store, check_name


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

    def apply(self, loaded: Any) -> None:
        from wandacli.removal.masks import apply_mask_file

        apply_mask_file(loaded, self.file)

    def close(self) -> None:
        self.file.close()


def mask_method(meta: dict[str, Any]) -> str:
    """The reference's `prune_method` for a mask: `wanda`, `wandg_set_difference`, ..."""
    if not meta:
        return "dense"
    sets = meta.get("score_sets") or [{}]
    method = str(sets[0].get("method") or "unknown")
    return f"{method}_set_difference" if meta.get("mode") == "set-difference" else method


class EditRemoval(Removal):
    kind = "edit"

    def __init__(self, edit: EditFile) -> None:
        self.file = edit
        self.path = edit.path
        self.meta = dict(edit.meta)

    def apply(self, loaded: Any) -> None:
        """W ← the edited weight, module by module, in float64 on the weight's device."""
        from wandacli.removal.ranks import edited_weight

        self.file.check_model(loaded.fingerprint, loaded.model_id)
        by_key = {lin.key: lin for lin in loaded.linear_layers}
        scale = direction_scale(self.meta)
        for key in self.file.keys:
            lin = by_key[key]
            bases = {role: torch.from_numpy(b) for role, b in self.file.bases(key).items()}
            matrix = lin.weight_matrix()
            new = edited_weight(matrix, self.file.mode, bases, scale=scale).to(matrix.dtype)
            with torch.no_grad():
                lin.weight.copy_(new.t() if lin.transposed else new)
        if self.meta.get("embedding"):  # the refusal direction leaves the embedding too
            from wandacli.removal.direction import orthogonalised_embedding

            embedding = loaded.model.get_input_embeddings().weight
            direction = torch.from_numpy(self.file.read_raw(DIRECTION_DATASET)).double()
            new = orthogonalised_embedding(embedding, direction / direction.norm(), scale)
            with torch.no_grad():
                embedding.copy_(new.to(embedding.dtype))

    def close(self) -> None:
        self.file.close()


EDIT_MODES = tuple(EditFile.BASES)


def direction_scale(meta: dict[str, Any]) -> float:
    """The share α of a direction an edit removes (`--direction-scale`; 1 in files made
    before it existed, and for every edit that is not a direction)."""
    return float(meta.get("direction_scale", 1.0))


def edit_method(meta: dict[str, Any]) -> str:
    """`actsvd_remove_top`, `actsvd_keep_top`, `actsvd_orthogonal_projection`,
    `refusal_direction`, or `random` for a `--match-ranks` control."""
    if meta.get("matched_edit"):
        return "random"
    return {
        "remove-top-ranks": "actsvd_remove_top",
        "keep-top-ranks": "actsvd_keep_top",
        "orthogonal-projection": "actsvd_orthogonal_projection",
        "random-ranks": "random",
        "direction": "refusal_direction",
    }.get(str(meta.get("mode")), "actsvd")


def open_removal(reference: str, store_root: Path | None) -> Removal:
    """A mask or an edit, by path (its format decides) or by name (masks/, then edits/)."""
    if reference.endswith(".h5") or "/" in reference:
        found = resolve_file(reference, store_root, "mask")
        fmt = stored_format(found)
        return EditRemoval(EditFile(found)) if fmt == EDIT_FORMAT else MaskRemoval(MaskFile(found))
    if store_root is None:
        raise StoreError(
            f"mask or edit {reference!r} given by name: pass --store, or the path of its .h5 file"
        )
    check_name(reference, "mask")
    mask = store_root / "masks" / f"{reference}.h5"
    edit = store_root / "edits" / f"{reference}.h5"
    if mask.is_file() and edit.is_file():
        raise StoreError(
            f"{reference!r} names both a mask and an edit in {store_root}: pass the path of the "
            f"one you mean ({mask} or {edit})"
        )
    if edit.is_file():
        return EditRemoval(EditFile(edit))
    if mask.is_file():
        return MaskRemoval(MaskFile(mask))
    store = Store(store_root)
    listing = ", ".join([*store.mask_names(), *store.edit_names()]) or "none"
    raise StoreError(f"no mask or edit {reference!r} in {store_root} (it has: {listing})")


PROVENANCE_NAME = "wandacli-mask.json"  # beside a saved model: the mask or edit it was made with


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
    import json
    import shlex

    from wandacli.core.errors import interruptible

    reporter.start("saving model", total=1)
    kept = f"while saving the model: {out} is unchanged; the {what} {source} is kept"
    provenance = {k: v for k, v in meta.items() if k != "model"}  # the model is the save itself
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
