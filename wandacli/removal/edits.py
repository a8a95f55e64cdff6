"""`prune` of an edit kind: the kind's edit computed module by module (from rank statistics and
the weights, from two mean-activations sets, or at random of a matched edit's size), streamed
atomically to DIR/edits/<name>.h5 and optionally applied to a saved model. Never runs the model
on data (but in the reference's sequential order)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from wandacli.core.console import Reporter
from wandacli.core.durable import atomic_h5, ensure_writable_directory, expected_file_bytes
from wandacli.core.memory import peak_rss_bytes
from wandacli.core.provenance import now_iso, refuse_other_request, software_versions
from wandacli.removal.apply import check_save_model_target, save_model_with
from wandacli.removal.content import EditContent, EditModule, apply_edit, removed_rank_fraction
from wandacli.removal.in_memory import WeightChanges
from wandacli.removal.kinds.base import EditKind
from wandacli.removal.request import RemovalRequest, RequestRun
from wandacli.removal.results import EditResult
from wandacli.removal.stored_request import request_changes
from wandacli.store.assemble import set_root_attrs, write_array
from wandacli.store.files import EditFile
from wandacli.store.lock import writer_lock
from wandacli.store.schema import DIRECTION_DATASET, EDIT_FORMAT, Store


class EditRun(RequestRun):
    """One `prune` of an edit kind, on sets the kind opened."""

    kind: EditKind

    def run(self) -> EditResult:
        request, sets = self.request, self.sets
        started = time.monotonic()
        final = Store(sets.root).edit_path(self.name)
        if request.save_model is not None:
            check_save_model_target(request.save_model, request.overwrite)
        ensure_writable_directory(sets.root)
        with writer_lock(sets.root, f"edits/{self.name}", shlex.join(self.command_line)):
            if final.exists() and not request.overwrite:
                finished = self._same_request(final, started)
                if request.save_model is None or (request.save_model / "config.json").exists():
                    return finished
            needs_model = self.kind.reads_model(request.settings) or request.save_model is not None
            loaded = self._load() if needs_model else None
            content = self.kind.content(request.settings, sets, loaded, self.reporter)
            meta = self._write(final, content, loaded)
            result = EditResult(
                name=self.name,
                path=final,
                mode=str(meta["mode"]),
                modules=len(meta["modules"]),
                removed_rank_fraction=float(meta["removed_rank_fraction"]),
                seconds=0.0,
                peak_memory_bytes=0,
                meta=meta,
            )
            if request.save_model is not None:
                assert loaded is not None
                result.saved_model = save_model_with(
                    loaded,
                    request.save_model,
                    final,
                    meta,
                    self.command_line,
                    self.reporter,
                    what="edit",
                )
        result.seconds = time.monotonic() - started
        result.peak_memory_bytes = peak_rss_bytes()
        return result

    def _same_request(self, final: Path, started: float) -> EditResult:
        """The finished edit as this run's result when asked for with the same settings (and,
        for a control, from the matched edit as it is now)."""
        with EditFile(final) as finished:
            differences = request_changes(finished.meta, self.request.request())
            differences += self.kind.remade(finished.meta, self.sets)
            refuse_other_request("edit", self.name, self.sets.root, differences)
            return EditResult(
                name=self.name,
                path=final,
                mode=finished.mode,
                modules=len(finished.keys),
                removed_rank_fraction=float(finished.meta.get("removed_rank_fraction") or 0.0),
                seconds=time.monotonic() - started,
                peak_memory_bytes=peak_rss_bytes(),
                meta=finished.meta,
                already_complete=True,
            )

    def _load(self) -> Any:
        from wandacli.models.loader import load_model

        assert self.request.model is not None
        loaded = load_model(self.request.model)
        self.sets.primary.check_model(loaded.fingerprint, loaded.model_id)
        return loaded

    def _write(self, final: Path, content: EditContent, loaded: Any) -> dict[str, Any]:
        """Each module's bases written as the content yields them (applied to the model too when
        it is to be saved); r once at /direction, every writer's `remove` a hard link to it."""
        shapes = self.sets.fingerprint.shapes
        keys = self.sets.keys
        array_bytes = self.kind.stored_bytes(self.request.settings, self.sets)
        modules: dict[str, dict[str, Any]] = {}
        changes = WeightChanges(loaded, undo=False) if self.request.save_model else None
        with atomic_h5(final, expected_file_bytes(array_bytes, 2 * len(keys))) as handle:
            if content.direction is not None:
                write_array(handle, DIRECTION_DATASET, content.direction)
            applied = apply_edit(content, changes) if changes is not None else iter(content.modules)
            for module in applied:
                self._write_module(handle, module, content)
                modules[module.key] = {
                    "ranks": module.ranks,
                    "removed_rank": module.removed_rank,
                    "full_rank": module.full_rank,
                    **({"scale": module.scale} if module.scale is not None else {}),
                }
            meta = {
                "mode": content.mode,
                "name": self.name,
                "modules": modules,
                "removed_rank_fraction": removed_rank_fraction(
                    {k: int(m["removed_rank"]) for k, m in modules.items()}, shapes
                ),
                **self.kind.stored_meta(self.request.settings, self.sets),
                "model": self.sets.primary.meta["model"],
                "search": self.request.search,
                "layers": self.request.layers,
                "modules_filter": self.request.modules,
                "config": self.request.to_json(),
                "request": self.request.request(),
                "command_line": shlex.join(self.command_line),
                "versions": software_versions(),
                "created": now_iso(),
            }
            set_root_attrs(handle, EDIT_FORMAT, meta)
        return meta

    @staticmethod
    def _write_module(handle: Any, module: EditModule, content: EditContent) -> None:
        for role, basis in module.bases.items():
            if basis is content.direction:  # r once, every writer's `remove` a link to it
                handle[f"{module.key}/remove"] = handle[DIRECTION_DATASET]
            else:
                write_array(handle, f"{module.key}/{role}", basis)


def run_edit(
    request: RemovalRequest,
    *,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
) -> EditResult:
    """An edit request written into the store (and applied to a saved model as it asks)."""
    assert request.family == "edit", request.kind
    return EditRun.of(request, reporter=reporter, command_line=command_line)
