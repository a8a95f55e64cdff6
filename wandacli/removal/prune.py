"""`prune` of a mask kind: the mask computed matrix by matrix from stored scores, streamed into
the store, optionally applied to the model and saved, or exported in the reference's `.pt`
format. Never computes scores, loads calibration data or takes gradients."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wandacli.config.settings import ModelSpec
from wandacli.core.console import Reporter
from wandacli.core.durable import atomic_h5, check_free_space, expected_file_bytes, temporary_path
from wandacli.core.errors import ConfigError, interruptible
from wandacli.core.memory import peak_rss_bytes
from wandacli.core.provenance import now_iso, refuse_other_request, software_versions
from wandacli.models.families import family_named
from wandacli.removal.apply import check_save_model_target, save_model_with
from wandacli.removal.content import apply_module_mask
from wandacli.removal.in_memory import WeightChanges
from wandacli.removal.kinds.base import MaskKind
from wandacli.removal.masks import TIE_RULE, zero_fraction
from wandacli.removal.request import RemovalRequest, RequestRun
from wandacli.removal.results import PruneResult
from wandacli.removal.stored_request import request_changes
from wandacli.store.assemble import set_root_attrs
from wandacli.store.files import MaskFile, write_mask_array
from wandacli.store.lock import writer_lock
from wandacli.store.schema import MASK_FORMAT, Store, split_key

if TYPE_CHECKING:
    from wandacli.models.pretrained import LoadedModel

# The keys every mask's meta has, whatever its kind (a kind sets those it decides).
MASK_META_DEFAULTS: dict[str, Any] = {
    "sparsity_ratio": None,
    "sparsity_type": "unstructured",
    "prune_highest": False,
    "variant": False,
    "scope": "row",
    "p": None,
    "q": None,
    "matched_mask": None,
}


class MaskRun(RequestRun):
    """One `prune` of a mask kind, on sets the kind opened."""

    kind: MaskKind

    def run(self) -> PruneResult:
        request, sets = self.request, self.sets
        started = time.monotonic()
        path = Store(sets.root).mask_path(self.name)
        replace_same_mask = False
        if path.exists() and not request.overwrite:
            created = self._check_same_request(path)
            if self._outputs_exist(path, created):
                return self._already_complete(path, started)
            # The same mask, with outputs it lacks: recompute it (the same bits) with them.
            replace_same_mask = True
        self._check_outputs(replace_same_mask)
        loaded = self._model_for()
        base = self._base_model(loaded) if request.recover_from_base else None
        with writer_lock(sets.root, f"masks/{self.name}", shlex.join(self.command_line)):
            packed = sum(o * ((i + 7) // 8) for o, i in sets.fingerprint.shapes.values())
            check_free_space(sets.root, packed, f"mask {self.name!r}")
            with interruptible(lambda: "no mask written; the store is unchanged"):
                counts = self._write_mask(path, loaded, base)
        result = PruneResult(
            name=self.name,
            path=path,
            mode=self.kind.mode(request.settings),
            counts=counts,
            seconds=0.0,
            peak_memory_bytes=0,
        )
        if request.export_mask is not None:
            result.exported_mask = self._export(path, loaded)
        if loaded is not None:
            result.model_zero_fraction = zero_fraction(loaded)
            assert request.save_model is not None
            result.saved_model = self._save(loaded, request.save_model, path)
        result.seconds = time.monotonic() - started
        result.peak_memory_bytes = peak_rss_bytes()
        return result

    # -- checks ---------------------------------------------------------------------------

    def _check_same_request(self, path: Path) -> Any:
        """A finished mask of this name must have been asked for with these settings, from
        these very score sets; refuses, naming what differs, when not. Returns when the mask
        was created."""
        with MaskFile(path) as finished:
            differences = request_changes(finished.meta, self.request.request())
            made_from = {s.get("role"): s for s in finished.meta.get("score_sets") or []}
            created = finished.meta.get("created")
            differences += self.kind.remade(finished.meta, self.sets)
        for role, score_set in (("scores", self.sets.primary), ("utility", self.sets.secondary)):
            if score_set is None:
                continue
            recorded = made_from.get(role) or {}
            if (recorded.get("fingerprint"), recorded.get("finished")) != (
                score_set.fingerprint.digest,
                score_set.meta.get("finished"),
            ):
                differences.append(
                    f"{role}: score set {score_set.name!r} was recomputed after the mask was made"
                )
        refuse_other_request("mask", path.stem, self.sets.root, differences)
        return created

    def _outputs_exist(self, mask_path: Path, created: Any) -> bool:
        """Whether every output asked for is there, made from this very mask."""
        from wandacli.removal.apply import read_provenance

        request = self.request
        saved = True
        if request.save_model is not None:
            recorded = read_provenance(request.save_model) or {}
            saved = recorded.get("mask_file") == str(mask_path) and (
                recorded.get("created") == created
            )
        exported = request.export_mask is None or request.export_mask.is_file()
        return saved and exported

    def _already_complete(self, path: Path, started: float) -> PruneResult:
        with MaskFile(path) as finished:
            counts = {}
            for key in finished.keys:
                mask = finished.read(key)
                counts[key] = (int(mask.sum()), mask.size)
            return PruneResult(
                name=path.stem,
                path=path,
                mode=str(finished.meta.get("mode", self.kind.mode(self.request.settings))),
                counts=counts,
                seconds=time.monotonic() - started,
                peak_memory_bytes=peak_rss_bytes(),
                saved_model=self.request.save_model,
                exported_mask=self.request.export_mask,
                meta=finished.meta,
                already_complete=True,
            )

    def _check_outputs(self, replace_same_mask: bool = False) -> None:
        """Refuse unwritable or existing outputs before any work (outputs of the same mask,
        recomputed, may be replaced)."""
        from wandacli.core.durable import ensure_writable_directory

        request = self.request
        replace = request.overwrite or replace_same_mask
        if request.save_model is not None:
            check_save_model_target(request.save_model, replace)
        if request.export_mask is not None:
            target = request.export_mask
            if target.is_dir():
                raise ConfigError(
                    f"--export-mask {target} is a directory: pass a file name such as mask.pt"
                )
            if target.exists() and not replace:
                raise ConfigError(
                    f"--export-mask {target} already exists: pass --overwrite to replace it"
                )
            ensure_writable_directory(target.parent, "--export-mask")

    def _model_for(self) -> LoadedModel | None:
        """The model to save (loaded in full), or only its structure to check shapes."""
        request = self.request
        if request.model is None:
            return None
        from wandacli.models.loader import load_model, model_structure

        if request.save_model is None:
            structure = model_structure(request.model)
            self.sets.primary.check_model(structure.fingerprint, structure.source.model_id)
            self.structure_layers = structure.layers
            return None
        loaded = load_model(request.model)
        self.sets.primary.check_model(loaded.fingerprint, loaded.model_id)
        return loaded

    def _base_model(self, loaded: LoadedModel | None) -> LoadedModel:
        from wandacli.models.loader import load_model

        request = self.request
        assert loaded is not None and request.recover_from_base is not None
        spec = request.model or ModelSpec()
        base = load_model(
            ModelSpec(
                model=request.recover_from_base,
                dtype=spec.dtype,
                device="cpu",
                cache_dir=spec.cache_dir,
                auto_dtype=spec.auto_dtype,
            )
        )
        mismatch = loaded.fingerprint.first_mismatch(
            base.fingerprint, mine="model", theirs="base model"
        )
        if mismatch:
            raise ConfigError(
                f"--recover-from-base {request.recover_from_base} does not match --model: {mismatch}"
            )
        return base

    # -- the mask -------------------------------------------------------------------------

    def _write_mask(
        self, path: Path, loaded: LoadedModel | None, base: LoadedModel | None
    ) -> dict[str, tuple[int, int]]:
        """Compute, write and (with a model) apply the mask, one matrix at a time: the kind's
        content, applied as a trial applies it."""
        sets, settings = self.sets, self.request.settings
        content = self.kind.content(settings, sets, self.kind.direct_rankings(sets))
        selected = set(content.keys)
        changes = WeightChanges(loaded, undo=False) if loaded is not None else None
        base_layers = {lin.key: lin for lin in base.linear_layers} if base is not None else {}
        counts: dict[str, tuple[int, int]] = {}
        keys = list(sets.fingerprint.shapes)
        self.reporter.start("pruning", total=len(keys))
        packed = sum(o * ((i + 7) // 8) for o, i in sets.fingerprint.shapes.values())
        with atomic_h5(path, expected_file_bytes(packed, len(keys))) as handle:
            for key in keys:
                shape = sets.fingerprint.shapes[key]
                mask = content.mask(key) if key in selected else np.zeros(shape, dtype=bool)
                write_mask_array(handle, key, mask)
                counts[key] = (int(mask.sum()), mask.size)
                if changes is not None and key in selected:
                    apply_module_mask(changes, key, mask, base_layers.get(key))
                self.reporter.advance()
            pruned = sum(p for p, _ in counts.values())
            total = sum(t for _, t in counts.values())
            set_root_attrs(handle, MASK_FORMAT, self._meta(pruned, total))
        self.reporter.finish()
        return counts

    def _meta(self, pruned: int, total: int) -> dict[str, Any]:
        request, sets = self.request, self.sets
        score_sets = [sets.primary] + ([sets.secondary] if sets.secondary is not None else [])
        return {
            "name": self.name,
            "mode": self.kind.mode(request.settings),
            **MASK_META_DEFAULTS,
            **self.kind.stored_meta(request.settings, sets),
            "layers": request.layers,
            "modules": request.modules,
            "search": request.search,
            "tie_rule": TIE_RULE,
            "actual_sparsity": pruned / total if total else 0.0,
            "pruned": pruned,
            "total": total,
            "score_sets": [
                {
                    "role": role,
                    "name": s.name,
                    "path": str(s.path),
                    "method": s.meta.get("method"),
                    "data": (s.meta.get("data") or {}).get("name"),
                    "fingerprint": s.fingerprint.digest,
                    "finished": s.meta.get("finished"),
                }
                for role, s in zip(("scores", "utility"), score_sets, strict=False)
            ],
            "model": {
                "id": sets.primary.meta["model"].get("id"),
                "layers_path": sets.primary.meta["model"].get("layers_path"),
                "fingerprint": sets.fingerprint.to_json(),
            },
            "config": request.to_json(),
            "request": request.request(),
            "command_line": shlex.join(self.command_line),
            "versions": software_versions(),
            "created": now_iso(),
        }

    # -- outputs --------------------------------------------------------------------------

    def _export(self, mask_path: Path, loaded: LoadedModel | None) -> Path:
        """The reference's fine-tuning mask: {module name: bool tensor}, True = pruned when
        pruning highest, True = kept otherwise (its `get_mask`). With a model loaded, every
        module with a weight is listed, as the reference lists them; without, the decoder's
        matrices. An expert's or a fused part's mask goes into its place in the whole weight
        (`<module>` for a fused weight, `<module>.<parameter>` for a 3-D expert parameter),
        which needs the model's layout (--model)."""
        import torch

        request = self.request
        assert request.export_mask is not None
        true_means_pruned = bool(getattr(request.settings, "prune_highest", False))
        layers_path = (
            loaded.layers_path
            if loaded
            else self.sets.primary.meta["model"].get("layers_path") or "model.layers"
        )
        known = loaded.linear_layers if loaded else getattr(self, "structure_layers", [])
        layers = {lin.key: lin for lin in known}
        pruned: dict[str, torch.Tensor] = {}  # module name → True = pruned, module layout
        with MaskFile(mask_path) as mask_file:
            family = family_named(mask_file.fingerprint.family)
            for key in mask_file.keys:
                layer, module = split_key(key)
                mask = torch.from_numpy(mask_file.read(key))
                lin = layers.get(key)
                if lin is None and family.has_parts(module):
                    raise ConfigError(
                        f"--export-mask needs --model for {module!r}: the mask of a fused or "
                        "expert matrix is exported in its place in the module's whole weight"
                    )
                if lin is not None and lin.module_name is not None:
                    name = f"{layers_path}.{layer}.{lin.module_name}"
                    if lin.parameter != "weight":
                        name += f".{lin.parameter}"
                    if name not in pruned:
                        pruned[name] = torch.zeros(lin.weight.shape, dtype=torch.bool)
                    lin.place(pruned[name], mask)
                    continue
                if lin is not None and lin.transposed:
                    mask = mask.t().contiguous()  # the module's own layout, as the reference
                pruned[f"{layers_path}.{layer}.{module}"] = mask
        exported: dict[str, torch.Tensor] = {}
        if loaded is not None:
            for module_name, module in loaded.model.named_modules():
                weight = getattr(module, "weight", None)
                if module_name not in pruned and isinstance(weight, torch.Tensor):
                    pruned_nothing = torch.zeros(weight.shape, dtype=torch.bool)
                    exported[module_name] = pruned_nothing if true_means_pruned else ~pruned_nothing
        for name, mask in pruned.items():
            exported[name] = mask if true_means_pruned else ~mask
        target = request.export_mask
        tmp = temporary_path(target)
        try:
            torch.save(exported, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def _save(self, loaded: LoadedModel, out: Path, mask_path: Path) -> Path:
        with MaskFile(mask_path) as mask_file:
            meta = dict(mask_file.meta)
        return save_model_with(
            loaded, out, mask_path, meta, self.command_line, self.reporter, what="mask"
        )


def run_prune(
    request: RemovalRequest,
    *,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
) -> PruneResult:
    """A mask request written into the store (and saved or exported as it asks)."""
    assert request.family == "mask", request.kind
    return MaskRun.of(request, reporter=reporter, command_line=command_line)
