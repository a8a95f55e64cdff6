"""A `prune` run: masks from stored scores, streamed one layer at a time into the store,
optionally applied to the model and saved, or exported in the reference's `.pt` format.

`prune` never computes scores, loads calibration data or takes gradients: it reads score sets.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wandacli.config.removal import PruneConfig, prune_request
from wandacli.config.settings import ModelSpec
from wandacli.core.console import NullReporter, Reporter
from wandacli.core.durable import (
    atomic_h5,
    check_free_space,
    ensure_writable_directory,
    expected_file_bytes,
    temporary_path,
)
from wandacli.core.errors import ConfigError, StoreError, interruptible
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.core.memory import peak_rss_bytes
from wandacli.core.naming import file_safe_name
from wandacli.core.provenance import (
    now_iso,
    refuse_other_request,
    request_differences,
    software_versions,
)
from wandacli.removal.apply import check_save_model_target, save_model_with
from wandacli.removal.masks import (
    TIE_RULE,
    apply_mask,
    count_mask,
    matrix_mask,
    nm_mask,
    row_mask,
    set_difference_mask,
    variant_mask,
    zero_fraction,
)
from wandacli.removal.requests import selected_keys, store_root_for
from wandacli.removal.results import PruneResult
from wandacli.store.assemble import set_root_attrs
from wandacli.store.files import MaskFile, ScoreSet, open_mask, open_score_set, write_mask_array
from wandacli.store.lock import writer_lock
from wandacli.store.schema import MASK_FORMAT, Store, split_key

if TYPE_CHECKING:
    from wandacli.models.pretrained import LoadedModel


def default_mask_name(config: PruneConfig, safety: str, utility: str | None) -> str:
    """A name that says how the mask was made, e.g. `wanda-align_short.r0.5.top`."""
    if config.set_difference:
        name = f"{safety}-minus-{utility}.q{config.q:g}.p{config.p:g}"
    elif config.match_counts is not None:
        name = f"{safety}.as-{Path(config.match_counts).stem}"
    elif config.nm is not None:
        name = f"{safety}.{config.nm[0]}of{config.nm[1]}"
    else:
        tag = {"variant": "v", "matrix": "m"}.get(config.mode, "r")
        name = f"{safety}.{tag}{config.sparsity_ratio:g}"
    if config.prune_highest and not config.set_difference:
        name += ".top"
    if config.layers:
        name += ".L" + config.layers.replace(",", "_")
    if config.modules:
        name += ".M" + config.modules
    return file_safe_name(name)


class PruneRun:
    """One `wandacli prune` invocation."""

    def __init__(
        self,
        config: PruneConfig,
        *,
        reporter: Reporter | None = None,
        command_line: list[str] | None = None,
    ) -> None:
        self.config = config
        self.reporter = reporter or NullReporter()
        self.command_line = command_line if command_line is not None else sys.argv
        self._matched: MaskFile | None = None  # the --match-counts mask, open during the run

    def run(self) -> PruneResult:
        config = self.config
        started = time.monotonic()
        root = store_root_for(config.scores, config.store)
        with contextlib.ExitStack() as stack:
            safety = stack.enter_context(open_score_set(config.scores, root))
            utility = None
            if config.utility_scores is not None:
                utility = stack.enter_context(open_score_set(config.utility_scores, root))
                _check_same_model(safety, utility)
            self._matched = None
            if config.match_counts is not None:
                self._matched = stack.enter_context(open_mask(config.match_counts, root))
                mismatch = safety.fingerprint.first_mismatch(
                    self._matched.fingerprint, mine="scores", theirs="--match-counts mask"
                )
                if mismatch:
                    raise StoreError(
                        f"--match-counts {config.match_counts} was made for another model: {mismatch}"
                    )
            keys = selected_keys(config, safety.fingerprint)
            if config.nm is not None:
                _check_divisible(safety.fingerprint, keys, config.nm[1])
            name = config.name or default_mask_name(
                config, safety.name, utility.name if utility else None
            )
            path = Store(root).mask_path(name)
            replace_same_mask = False
            if path.exists() and not config.overwrite:
                created = self._check_same_request(path, root, safety, utility)
                if self._outputs_exist(path, created):
                    return self._already_complete(path, started)
                # The same mask, with outputs it lacks: recompute it (the same bits) with them.
                replace_same_mask = True
            self._check_outputs(replace_same_mask)
            loaded = self._model_for(safety)
            base = self._base_model(loaded) if config.recover_from_base else None
            with writer_lock(root, shlex.join(self.command_line)):
                packed_bytes = sum(
                    o * ((i + 7) // 8) for o, i in safety.fingerprint.shapes.values()
                )
                check_free_space(root, packed_bytes, f"mask {name!r}")
                with interruptible(lambda: "no mask written; the store is unchanged"):
                    counts = self._write_mask(path, safety, utility, keys, loaded, base, name)
            result = PruneResult(
                name=name,
                path=path,
                mode=config.mode,
                counts=counts,
                seconds=0.0,
                peak_memory_bytes=0,
            )
            if config.export_mask is not None:
                result.exported_mask = self._export(path, loaded, safety)
            if loaded is not None:
                result.model_zero_fraction = zero_fraction(loaded)
                assert config.save_model is not None
                result.saved_model = self._save(loaded, config.save_model, path)
        result.seconds = time.monotonic() - started
        result.peak_memory_bytes = peak_rss_bytes()
        return result

    # -- checks ---------------------------------------------------------------------------

    def _check_same_request(
        self, path: Path, root: Path, safety: ScoreSet, utility: ScoreSet | None
    ) -> Any:
        """A finished mask of this name must have been asked for with these settings, from
        these very score sets; refuses, naming what differs, when not. Returns when the mask
        was created."""

        with MaskFile(path) as finished:
            differences = request_differences(finished.meta, self.config.request(), prune_request)
            made_from = {s.get("role"): s for s in finished.meta.get("score_sets") or []}
            created = finished.meta.get("created")
            matched_created = (finished.meta.get("matched_mask") or {}).get("created")
        if self._matched is not None and matched_created != self._matched.meta.get("created"):
            differences.append(
                f"--match-counts mask {self._matched.name!r} was remade after this mask"
            )
        for role, score_set in (("scores", safety), ("utility", utility)):
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
        refuse_other_request("mask", path.stem, root, differences)
        return created

    def _outputs_exist(self, mask_path: Path, created: Any) -> bool:
        """Whether every output asked for is there, made from this very mask."""
        import json

        config = self.config
        saved = True
        if config.save_model is not None:
            provenance = config.save_model / "wandacli-mask.json"
            try:
                recorded = json.loads(provenance.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                recorded = {}
            saved = recorded.get("mask_file") == str(mask_path) and (
                recorded.get("created") == created
            )
        exported = config.export_mask is None or config.export_mask.is_file()
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
                mode=str(finished.meta.get("mode", self.config.mode)),
                counts=counts,
                seconds=time.monotonic() - started,
                peak_memory_bytes=peak_rss_bytes(),
                saved_model=self.config.save_model,
                exported_mask=self.config.export_mask,
                meta=finished.meta,
                already_complete=True,
            )

    def _check_outputs(self, replace_same_mask: bool = False) -> None:
        """Refuse unwritable or existing outputs before any work (outputs of the same mask,
        recomputed, may be replaced)."""
        config = self.config
        replace = config.overwrite or replace_same_mask
        if config.save_model is not None:
            check_save_model_target(config.save_model, replace)
        if config.export_mask is not None:
            target = config.export_mask
            if target.is_dir():
                raise ConfigError(
                    f"--export-mask {target} is a directory: pass a file name such as mask.pt"
                )
            if target.exists() and not replace:
                raise ConfigError(
                    f"--export-mask {target} already exists: pass --overwrite to replace it"
                )
            ensure_writable_directory(target.parent, "--export-mask")

    def _model_for(self, safety: ScoreSet) -> LoadedModel | None:
        """The model to save (loaded in full), or only its structure to check shapes."""
        config = self.config
        if config.model is None:
            return None
        from wandacli.models.loader import load_model, model_structure

        if config.save_model is None:
            structure = model_structure(config.model)
            safety.check_model(structure.fingerprint, structure.source.model_id)
            return None
        spec = config.model
        if spec.dtype == "auto":
            # A saved model keeps its checkpoint's dtype (a float16 7B model saved as float32
            # would double in size).
            spec = ModelSpec(**{**spec.__dict__, "dtype": "checkpoint"})
        loaded = load_model(spec)
        safety.check_model(loaded.fingerprint, loaded.model_id)
        return loaded

    def _base_model(self, loaded: LoadedModel | None) -> LoadedModel:
        from wandacli.models.loader import load_model

        assert loaded is not None and self.config.recover_from_base is not None
        spec = self.config.model or ModelSpec()
        base = load_model(
            ModelSpec(
                model=self.config.recover_from_base,
                dtype=spec.dtype,
                device="cpu",
                cache_dir=spec.cache_dir,
            )
        )
        mismatch = loaded.fingerprint.first_mismatch(
            base.fingerprint, mine="model", theirs="base model"
        )
        if mismatch:
            raise ConfigError(
                f"--recover-from-base {self.config.recover_from_base} does not match --model: {mismatch}"
            )
        return base

    # -- the mask -------------------------------------------------------------------------

    def _mask(self, key: str, safety: ScoreSet, utility: ScoreSet | None) -> np.ndarray:
        config = self.config
        scores = safety.read(key)
        if utility is not None:
            assert config.p is not None and config.q is not None
            return set_difference_mask(scores, utility.read(key), config.p, config.q)
        highest = config.prune_highest
        if self._matched is not None:
            count = int(self._matched.read(key).sum())
            return count_mask(scores, count, prune_highest=highest)
        if config.nm is not None:
            return nm_mask(scores, *config.nm, prune_highest=highest)
        assert config.sparsity_ratio is not None
        if config.variant:
            return variant_mask(scores, config.sparsity_ratio, prune_highest=highest)
        if config.scope == "matrix":
            return matrix_mask(scores, config.sparsity_ratio, prune_highest=highest)
        return row_mask(scores, config.sparsity_ratio, prune_highest=highest)

    def _write_mask(
        self,
        path: Path,
        safety: ScoreSet,
        utility: ScoreSet | None,
        keys: list[str],
        loaded: LoadedModel | None,
        base: LoadedModel | None,
        name: str,
    ) -> dict[str, tuple[int, int]]:
        """Compute, write and (with a model) apply the mask, one layer at a time."""
        selected = set(keys)
        counts: dict[str, tuple[int, int]] = {}
        layers = {lin.key: lin for lin in loaded.linear_layers} if loaded else {}
        base_layers = {lin.key: lin for lin in base.linear_layers} if base else {}
        self.reporter.start("pruning", total=len(safety.keys))
        packed = sum(o * ((i + 7) // 8) for o, i in safety.fingerprint.shapes.values())
        with atomic_h5(path, expected_file_bytes(packed, len(safety.keys))) as handle:
            for key in safety.keys:
                shape = safety.fingerprint.shapes[key]
                if key in selected:
                    mask = self._mask(key, safety, utility)
                else:
                    mask = np.zeros(shape, dtype=bool)
                write_mask_array(handle, key, mask)
                counts[key] = (int(mask.sum()), mask.size)
                if key in layers and key in selected:
                    apply_mask(layers[key], mask, base_layers.get(key))
                self.reporter.advance()
            pruned = sum(p for p, _ in counts.values())
            total = sum(t for _, t in counts.values())
            set_root_attrs(handle, MASK_FORMAT, self._meta(safety, utility, name, pruned, total))
        self.reporter.finish()
        return counts

    def _meta(
        self, safety: ScoreSet, utility: ScoreSet | None, name: str, pruned: int, total: int
    ) -> dict[str, Any]:
        config = self.config
        sets = [safety] + ([utility] if utility is not None else [])
        return {
            "name": name,
            "mode": config.mode,
            "sparsity_ratio": config.effective_ratio,
            "sparsity_type": config.sparsity_type if not config.set_difference else None,
            "prune_highest": config.prune_highest and not config.set_difference,
            "variant": config.variant,
            "scope": config.scope,
            "p": config.p,
            "q": config.q,
            "layers": config.layers,
            "modules": config.modules,
            "matched_mask": {
                "path": str(self._matched.path),
                "created": self._matched.meta.get("created"),
                "pruned": self._matched.meta.get("pruned"),
            }
            if self._matched is not None
            else None,
            "search": config.search,
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
                for role, s in zip(("scores", "utility"), sets, strict=False)
            ],
            "model": {
                "id": safety.meta["model"].get("id"),
                "layers_path": safety.meta["model"].get("layers_path"),
                "fingerprint": safety.fingerprint.to_json(),
            },
            "config": config.to_json(),
            "command_line": shlex.join(self.command_line),
            "versions": software_versions(),
            "created": now_iso(),
        }

    # -- outputs --------------------------------------------------------------------------

    def _export(self, mask_path: Path, loaded: LoadedModel | None, safety: ScoreSet) -> Path:
        """The reference's fine-tuning mask: {module name: bool tensor}, True = pruned when
        pruning highest, True = kept otherwise (its `get_mask`). With a model loaded, every
        module with a weight is listed, as the reference lists them; without, the decoder's
        linear layers."""
        import torch

        config = self.config
        assert config.export_mask is not None
        true_means_pruned = config.prune_highest
        layers_path = (
            loaded.layers_path
            if loaded
            else safety.meta["model"].get("layers_path") or "model.layers"
        )
        exported: dict[str, torch.Tensor] = {}
        with MaskFile(mask_path) as mask_file:
            linear_names = {}
            for key in mask_file.keys:
                layer, module = split_key(key)
                linear_names[f"{layers_path}.{layer}.{module}"] = key
            if loaded is not None:
                for module_name, module in loaded.model.named_modules():
                    weight = getattr(module, "weight", None)
                    if module_name in linear_names or not isinstance(weight, torch.Tensor):
                        continue
                    unpruned = torch.zeros(weight.shape, dtype=torch.bool)
                    exported[module_name] = unpruned if true_means_pruned else ~unpruned
            for module_name, key in linear_names.items():
                mask = torch.from_numpy(mask_file.read(key))
                if loaded is not None:
                    lin = next(lin for lin in loaded.linear_layers if lin.key == key)
                    if lin.transposed:  # the module's own layout, as the reference saves it
                        mask = mask.t().contiguous()
                exported[module_name] = mask if true_means_pruned else ~mask
        target = config.export_mask
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


def _check_same_model(safety: ScoreSet, utility: ScoreSet) -> None:
    mismatch = safety.fingerprint.first_mismatch(
        utility.fingerprint, mine="safety scores", theirs="utility scores"
    )
    if mismatch:
        raise StoreError(
            f"the safety and utility score sets come from different models: {mismatch}"
        )
    safety_id, utility_id = safety.meta["model"].get("id"), utility.meta["model"].get("id")
    if safety_id != utility_id:
        raise StoreError(
            f"the safety and utility score sets come from different models ({safety_id} vs "
            f"{utility_id}): score both on the same model"
        )


def _check_divisible(fingerprint: ModelFingerprint, keys: list[str], m: int) -> None:
    for key in keys:
        in_features = fingerprint.shapes[key][1]
        if in_features % m:
            layer, module = split_key(key)
            raise ConfigError(
                f"N:M with M={m} needs in_features divisible by {m}: layer {layer} {module} has {in_features}"
            )


def run_prune(
    config: PruneConfig, *, reporter: Reporter | None = None, command_line: list[str] | None = None
) -> PruneResult:
    """Build a mask from stored scores as `config` says, write it to the store, and save or
    export what was asked."""
    return PruneRun(config, reporter=reporter, command_line=command_line).run()
