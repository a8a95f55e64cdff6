"""A resumable `score` run: load, gather statistics sample by sample with checkpoints, assemble
the score set, clean up.

Work in progress lives in `scores/<set>.parts/` (see store.py). Killing a run keeps what it
finished; running the same command again resumes and produces a score set bitwise identical to
an uninterrupted run (statistics are summed in the same order from the same checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wandacli import distributed
from wandacli.config import DEFAULT_SEQLEN_CAP, ModelSpec, ScoreConfig, score_request
from wandacli.console import NullReporter, Reporter, info, warn
from wandacli.data import (
    CalibrationSet,
    build_calibration_set,
    data_display_name,
    indices_digest,
    load_raw,
)
from wandacli.errors import (
    ModelError,
    NonFiniteScoresError,
    ResumeMismatchError,
    StoreError,
    interruptible,
)
from wandacli.memory import peak_gpu_bytes, peak_rss_bytes, return_freed_memory_promptly
from wandacli.models import LinearLayer, LoadedModel, load_model, model_max_length
from wandacli.scoring import (
    ActivationStatistics,
    GradientAccumulator,
    random_scores,
    snip_scores,
    wanda_scores,
    weight_magnitude,
)
from wandacli.store import (
    SCORES_FORMAT,
    STATS_GROUP,
    ScoreSet,
    Store,
    StoredFile,
    atomic_h5,
    check_free_space,
    check_resumable,
    ensure_writable_directory,
    expected_file_bytes,
    format_non_finite,
    non_finite_counts,
    now_iso,
    open_part,
    read_part,
    set_root_attrs,
    settings_differences,
    software_versions,
    to_float16_checked,
    write_array,
    write_manifest,
    write_part,
    writer_lock,
)


@dataclass
class ScoreResult:
    """What a finished run reports."""

    name: str
    path: Path
    method: str
    nsamples: int
    seconds: float
    peak_memory_bytes: int
    peak_gpu_memory_bytes: int | None
    resumed: bool
    layers: int
    modules: int
    parameters: int
    meta: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    already_complete: bool = False  # a finished set with the same settings: nothing computed

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "already_complete": self.already_complete,
            "path": str(self.path),
            "method": self.method,
            "nsamples": self.nsamples,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_gpu_memory_bytes": self.peak_gpu_memory_bytes,
            "resumed": self.resumed,
            "layers": self.layers,
            "modules": self.modules,
            "parameters": self.parameters,
            "world_size": self.world_size,
        }


class ScoreRun:
    """One `wandacli score` invocation."""

    def __init__(
        self,
        config: ScoreConfig,
        *,
        reporter: Reporter | None = None,
        command_line: list[str] | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config
        self.reporter = reporter or NullReporter()
        self.command_line = command_line if command_line is not None else sys.argv
        self._loaded = loaded  # tests and benchmarks may pass a model already in memory
        self.store = Store(Path(config.store))
        self.name = ""
        self.parts_dir = Path()
        self.resumed = False
        self.dist = distributed.SINGLE

    # -- the whole run --------------------------------------------------------------------

    def run(self) -> ScoreResult:
        config = self.config
        started_at, started = now_iso(), time.monotonic()
        return_freed_memory_promptly()
        self.dist = distributed.from_environment(config.model.device)
        main = self.dist.is_main
        if not main:
            self.reporter = NullReporter()  # one progress bar: rank 0's
        if config.needs_data is False and config.data:
            warn(f"--method {config.method} uses no calibration data; --data is ignored")
        data_name = data_display_name(config.data) if config.needs_data and config.data else None
        self.name = config.name or config.default_name(data_name)
        final = self.store.score_set_path(self.name)
        self.parts_dir = self.store.parts_dir(self.name)
        if main:
            ensure_writable_directory(self.store.root)
        # Only rank 0 touches the store: it holds the lock and writes every file.
        lock = (
            writer_lock(self.store.root, shlex.join(self.command_line))
            if main
            else contextlib.nullcontext()
        )
        with lock, interruptible(self._what_is_kept):
            complete = None
            if main and final.exists():
                # Parts beside a finished set are leftovers of a run killed while cleaning up.
                shutil.rmtree(self.parts_dir, ignore_errors=True)
                if not config.overwrite:  # decide before loading the model and data
                    complete = self._finished_set_with_same_request(final)
            if self.dist.broadcast_int(int(complete is not None)):
                if self.dist.active:
                    distributed.shutdown()
                if complete is None:  # the other ranks of a distributed run; rank 0 reports
                    with ScoreSet(final) as finished:
                        complete = self._already_complete(finished, started)
                return complete
            loaded = self._loaded or load_model(self._rank_model_spec())
            calibration = self._calibration(loaded) if config.needs_data else None
            base_layers = self._base_layers(loaded) if config.use_diff else None
            settings = self._settings(loaded, calibration, base_layers)
            groups = self._groups(loaded.linear_layers)
            if main:
                self._prepare_parts(settings, loaded, final, len(groups), started_at)
            self.resumed = bool(self.dist.broadcast_int(int(self.resumed)))
            meta = self._meta(loaded, calibration, base_layers, started_at)
            self._compute_and_assemble(loaded, calibration, base_layers, groups, final, meta)
            if main:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.dist.barrier()
        if self.dist.active:
            distributed.shutdown()
        seconds = time.monotonic() - started
        return ScoreResult(
            name=self.name,
            path=final,
            method=config.method,
            nsamples=len(calibration.samples) if calibration else 0,
            seconds=seconds,
            peak_memory_bytes=peak_rss_bytes(),
            peak_gpu_memory_bytes=peak_gpu_bytes(),
            resumed=self.resumed,
            layers=loaded.fingerprint.num_layers,
            modules=len(loaded.linear_layers),
            parameters=sum(a * b for a, b in loaded.fingerprint.shapes.values()),
            meta=meta,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def _rank_model_spec(self) -> ModelSpec:
        """Each rank of a multi-GPU run on its own GPU."""
        spec = self.config.model
        if (
            self.dist.active
            and spec.device_map is None
            and torch.cuda.is_available()
            and spec.device in ("auto", "cuda")
        ):
            return dataclasses.replace(spec, device=f"cuda:{self.dist.local_rank}")
        return spec

    def _prepare_parts(
        self,
        settings: dict[str, Any],
        loaded: LoadedModel,
        final: Path,
        groups: int,
        started_at: str,
    ) -> None:
        """Rank 0: resume or discard unfinished work, check space, record the settings."""
        config = self.config
        try:
            self.resumed = check_resumable(self.parts_dir, settings, self.name)
        except ResumeMismatchError:
            if not config.overwrite:
                raise
            # --overwrite discards unfinished work made with other settings; work with the
            # same settings is still resumed (it is what this run would compute).
            shutil.rmtree(self.parts_dir)
            self.resumed = False
        self._check_space(loaded, final)
        if config.needs_data:  # magnitude and random have nothing worth resuming
            write_manifest(self.parts_dir, settings, {"groups": groups, "started": started_at})
        if self.resumed:
            info(f"resuming unfinished score set {self.name!r} from {self.parts_dir}")

    def _what_is_kept(self) -> str:
        kept = (
            sorted(p.name for p in self.parts_dir.glob("*.h5")) if self.parts_dir.is_dir() else []
        )
        if not kept:
            return "nothing was finished yet; run the same command again to start over"
        return f"kept {', '.join(kept)} in {self.parts_dir}; run the same command again to resume"

    def _finished_set_with_same_request(self, final: Path) -> ScoreResult:
        """The finished set as this run's result when it was asked for with the same settings
        (and its data file still has the same content); refuses, naming what differs, when not."""
        config = self.config
        with ScoreSet(final) as finished:
            stored = finished.meta.get("config")
            differences = (
                settings_differences(score_request(stored), config.request())
                if isinstance(stored, dict)
                else ["settings: not recorded (made by an older wandacli)"]
            )
            if not differences and config.needs_data and config.data:
                stored_sha = (finished.meta.get("data") or {}).get("sha256")
                raw = load_raw(config.data, columns=config.columns, directory=config.data_dir)
                if raw.content_hash != stored_sha:
                    differences = [
                        f"data_sha256: {str(stored_sha)[:12]}… → {raw.content_hash[:12]}… "
                        f"({raw.source})"
                    ]
            if differences:
                raise StoreError(
                    f"score set {self.name!r} already exists in {self.store.root} with other "
                    f"settings ({'; '.join(differences[:4])}): pass --overwrite to recompute "
                    "it, or --name to write another set"
                )
            return self._already_complete(finished, time.monotonic())

    def _already_complete(self, finished: ScoreSet, started: float) -> ScoreResult:
        meta = finished.meta
        shapes = finished.fingerprint.shapes
        return ScoreResult(
            name=self.name,
            path=finished.path,
            method=str(meta.get("method", self.config.method)),
            nsamples=int(meta.get("nsamples") or 0),
            seconds=time.monotonic() - started,
            peak_memory_bytes=peak_rss_bytes(),
            peak_gpu_memory_bytes=None,
            resumed=False,
            layers=finished.fingerprint.num_layers,
            modules=len(shapes),
            parameters=sum(a * b for a, b in shapes.values()),
            meta=meta,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            already_complete=True,
        )

    # -- inputs ---------------------------------------------------------------------------

    def _calibration(self, loaded: LoadedModel) -> CalibrationSet:
        config = self.config
        assert config.data is not None
        raw = load_raw(config.data, columns=config.columns, directory=config.data_dir)
        max_len = model_max_length(loaded.model)
        seqlen = config.seqlen or min(DEFAULT_SEQLEN_CAP, max_len or DEFAULT_SEQLEN_CAP)
        if max_len is not None and seqlen > max_len:
            raise ModelError(
                f"--seqlen {seqlen} exceeds the model's context of {max_len}: use --seqlen {max_len} or less"
            )
        return build_calibration_set(
            raw,
            loaded.tokenizer,
            nsamples=config.nsamples,
            seed=config.seed,
            seqlen=seqlen,
            disentangle=not config.entangle,
            template=config.template,
        )

    def _base_layers(self, loaded: LoadedModel) -> dict[str, LinearLayer]:
        config = self.config
        assert config.base_model is not None
        # The base model stays on the CPU: only its weights are read, one layer at a time.
        base = load_model(
            ModelSpec(
                model=config.base_model,
                dtype=config.model.dtype,
                device="cpu",
                cache_dir=config.model.cache_dir,
            )
        )
        mismatch = loaded.fingerprint.first_mismatch(
            base.fingerprint, mine="model", theirs="base model"
        )
        if mismatch:
            raise ModelError(f"--base-model {config.base_model} does not match --model: {mismatch}")
        return {lin.key: lin for lin in base.linear_layers}

    def _settings(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> dict[str, Any]:
        """Everything that changes the numbers: a resume must match all of it."""
        config = self.config
        settings: dict[str, Any] = {
            "method": config.method,
            "model": loaded.model_id,
            "model_fingerprint": loaded.fingerprint.digest,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "device": loaded.device.type,
            "score_dtype": config.score_dtype,
            "use_diff": config.use_diff,
            "base_model": config.base_model,
        }
        if calibration is not None:
            settings.update(
                {
                    "data": calibration.name,
                    "data_sha256": calibration.content_hash,
                    "nsamples": len(calibration.samples),
                    "seed": config.seed,
                    "seqlen": calibration.seqlen,
                    "disentangle": calibration.disentangle,
                    "template": calibration.template,
                    "sample_indices": indices_digest(calibration.indices),
                }
            )
        elif config.method == "random":
            settings["seed"] = config.seed
        if config.method == "wandg":
            settings["layers_per_pass"] = config.layers_per_pass
        if self.dist.active:  # each rank's partial sums are checkpointed together
            settings["world_size"] = self.dist.world_size
        return settings

    def _meta(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        started_at: str,
    ) -> dict[str, Any]:
        config = self.config
        meta: dict[str, Any] = {
            "method": config.method,
            "name": self.name,
            "model": {
                "id": loaded.model_id,
                "source": loaded.source.kind,
                "layers_path": loaded.layers_path,
                "fingerprint": loaded.fingerprint.to_json(),
            },
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "device": str(loaded.device),
            "score_dtype": config.score_dtype,
            "use_diff": config.use_diff,
            "base_model": config.base_model,
            "seed": config.seed,
            "versions": software_versions(),
            "command_line": shlex.join(self.command_line),
            "config": config.to_json(),
            "started": started_at,
        }
        if calibration is not None:
            meta["data"] = {
                "name": calibration.name,
                "source": calibration.source,
                "sha256": calibration.content_hash,
                "indices": calibration.indices,
                "indices_are": "rows" if calibration.disentangle else "token window starts",
                "truncated_samples": calibration.truncated,
                "counted_tokens": sum(s.num_counted for s in calibration.samples),
            }
            meta.update(
                nsamples=len(calibration.samples),
                seqlen=calibration.seqlen,
                disentangle=calibration.disentangle,
                template=calibration.template,
            )
        if config.method == "wandg":
            meta["layers_per_pass"] = config.layers_per_pass
            meta["offload_accumulators"] = config.offload_accumulators
        meta["world_size"] = self.dist.world_size
        return meta

    def _groups(self, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
        """wandg's layer groups: `--layers-per-pass` decoder layers each (all in one by default)."""
        if self.config.method != "wandg" or self.config.layers_per_pass == 0:
            return [layers]
        per = self.config.layers_per_pass
        groups: dict[int, list[LinearLayer]] = {}
        for lin in layers:
            groups.setdefault(lin.layer // per, []).append(lin)
        return [groups[k] for k in sorted(groups)]

    def _check_space(self, loaded: LoadedModel, final: Path) -> None:
        itemsize = 2 if self.config.score_dtype == "float16" else 4
        total = sum(a * b for a, b in loaded.fingerprint.shapes.values())
        # wandg keeps each group's scores as a part until assembly: twice the set's size.
        factor = 2 if self.config.method == "wandg" else 1
        check_free_space(self.store.root, total * itemsize * factor, f"score set {self.name!r}")

    # -- computation ----------------------------------------------------------------------

    def _compute_and_assemble(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
        final: Path,
        meta: dict[str, Any],
    ) -> None:
        method = self.config.method
        stats: dict[str, torch.Tensor] | None = None
        last_group: GradientAccumulator | None = None
        if method == "wanda":
            assert calibration is not None
            stats = self._gather_wanda(loaded, calibration)
        elif method == "wandg":
            assert calibration is not None
            for index, group in enumerate(groups):
                last_group = self._gather_wandg_group(
                    loaded, calibration, group, index, len(groups), base_layers
                )
        if self.dist.is_main:
            self._assemble(loaded, calibration, base_layers, stats, groups, last_group, final, meta)

    def _sample_loop(
        self,
        calibration: CalibrationSet,
        done: int,
        label: str,
        observe: Any,
        checkpoint: Any,
    ) -> int:
        """Run `observe` on this rank's samples from step `done` on, calling `checkpoint(step)`
        every --checkpoint-every steps; returns the number of steps. Every rank runs the same
        number of steps (some without a sample), so that collective calls line up."""
        total = len(calibration.samples)
        local = self.dist.local_indices(total)
        steps = self.dist.steps(total)
        interval = self.config.checkpoint_interval
        self.reporter.start(label, total=steps, completed=done)
        for step in range(done, steps):
            if step < len(local):
                observe(calibration.samples[local[step]])
            self.reporter.advance()
            finished = step + 1
            if finished < steps and interval and finished % interval == 0:
                checkpoint(finished)
        self.reporter.finish()
        return steps

    def _gather_wanda(
        self, loaded: LoadedModel, calibration: CalibrationSet
    ) -> dict[str, torch.Tensor]:
        statistics = ActivationStatistics(loaded.linear_layers)
        done = self.dist.broadcast_int(self._restore_wanda(statistics) if self.dist.is_main else 0)

        def observe(sample: Any) -> None:
            counted = sample.counted.to(loaded.input_device) if calibration.disentangle else None
            statistics.observe(loaded.model, sample.input_ids.to(loaded.input_device), counted)

        with statistics.recording():
            steps = self._sample_loop(
                calibration,
                done,
                "wanda: samples",
                observe,
                lambda step: self._checkpoint(
                    statistics.sums,
                    f"stats-{step:06d}.h5",
                    "stats-*.h5",
                    {"samples": step, "kind": "wanda-sums"},
                ),
            )
        self.dist.all_reduce_sum(statistics.sums.values())
        if done < steps:  # keep every statistic before assembly
            self._checkpoint(
                statistics.sums,
                f"stats-{steps:06d}.h5",
                "stats-*.h5",
                {"samples": steps, "kind": "wanda-sums"},
                reduced=True,
            )
        return statistics.sums

    def _restore_wanda(self, statistics: ActivationStatistics) -> int:
        """Load the latest readable statistics checkpoint; returns the steps it covers."""
        return self._restore(statistics.load, "stats-*.h5")

    def _restore(self, load: Any, pattern: str) -> int:
        for path in sorted(self.parts_dir.glob(pattern), reverse=True):
            part = read_part(path)
            if part is None:
                warn(f"damaged part file {path}: removed, recomputing what it held")
                continue
            arrays, attrs = part
            load({k: torch.from_numpy(v) for k, v in arrays.items()})
            return int(attrs["samples"])
        return 0

    def _checkpoint(
        self,
        sums: dict[str, torch.Tensor],
        name: str,
        pattern: str,
        attrs: dict[str, Any],
        *,
        reduced: bool = False,
    ) -> None:
        """Rank 0 writes the sums over every rank's samples so far (a collective call)."""
        if self.dist.active and not reduced:
            sums = {k: v.clone() for k, v in sums.items()}
            self.dist.all_reduce_sum(sums.values())
        if not self.dist.is_main:
            return
        arrays = ((k, v.detach().cpu().numpy()) for k, v in sums.items())
        size = expected_file_bytes(sum(v.numel() * 4 for v in sums.values()), len(sums))
        write_part(self.parts_dir / name, arrays, attrs, size)
        # Keep only the newest two checkpoints: the previous one covers a damaged newest one.
        for older in sorted(self.parts_dir.glob(pattern))[:-2]:
            older.unlink(missing_ok=True)

    def _gather_wandg_group(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet,
        group: list[LinearLayer],
        index: int,
        count: int,
        base_layers: dict[str, LinearLayer] | None,
    ) -> GradientAccumulator | None:
        """Sum |grad| for one layer group. Every group but the last is saved as a part and
        freed; the last one stays in memory and goes straight into the score set (its
        accumulator checkpoints cover it until the set is in place), saving a write and a
        read of up to the whole set's size."""
        last = index == count - 1
        group_path = self._group_part(index)
        finished = 0
        if not last and self.dist.is_main and group_path.exists():
            part = open_part(group_path)
            if part is not None:
                part.close()
                finished = 1
            else:
                warn(f"damaged part file {group_path}: removed, recomputing layer group {index}")
        if self.dist.broadcast_int(finished):
            return None
        accumulator = GradientAccumulator(group, offload=self.config.offload_accumulators)
        pattern = f"accum-g{index:04d}-*.h5"
        done = self.dist.broadcast_int(
            self._restore(accumulator.load, pattern) if self.dist.is_main else 0
        )
        first_layer, last_layer = group[0].layer, group[-1].layer
        label = (
            "wandg: samples"
            if count == 1
            else f"wandg: layers {first_layer}-{last_layer} ({index + 1}/{count})"
        )

        def observe(sample: Any) -> None:
            if sample.num_counted > 0:  # a sample with no counted token has no loss
                input_ids = sample.input_ids.to(loaded.input_device)
                accumulator.observe(loaded.model, input_ids, sample.labels.to(loaded.input_device))

        with accumulator.recording():
            self._sample_loop(
                calibration,
                done,
                label,
                observe,
                lambda step: self._checkpoint(
                    accumulator.sums,
                    f"accum-g{index:04d}-{step:06d}.h5",
                    pattern,
                    {"samples": step, "group": index, "kind": "wandg-accumulators"},
                ),
            )
        self.dist.all_reduce_sum(accumulator.sums.values())
        if last:
            return accumulator
        if self.dist.is_main:
            scores = (
                (lin.key, self._snip(lin, accumulator, base_layers).cpu().numpy()) for lin in group
            )
            size = expected_file_bytes(
                sum(lin.shape[0] * lin.shape[1] * 4 for lin in group), len(group)
            )
            write_part(group_path, scores, {"group": index, "kind": "wandg-scores"}, size)
            for stale in self.parts_dir.glob(pattern):
                stale.unlink(missing_ok=True)
        return None

    def _group_part(self, index: int) -> Path:
        return self.parts_dir / f"group-{index:04d}.h5"

    @staticmethod
    def _snip(
        lin: LinearLayer,
        accumulator: GradientAccumulator,
        base_layers: dict[str, LinearLayer] | None,
    ) -> torch.Tensor:
        base = base_layers[lin.key].weight_matrix() if base_layers else None
        magnitude = weight_magnitude(lin.weight_matrix(), base)
        return snip_scores(magnitude, accumulator.scores_layout(lin).to(magnitude.device))

    # -- assembly -------------------------------------------------------------------------

    def _assemble(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        stats: dict[str, torch.Tensor] | None,
        groups: list[list[LinearLayer]],
        last_group: GradientAccumulator | None,
        final: Path,
        meta: dict[str, Any],
    ) -> None:
        """Write the score set to a temporary file one layer at a time, refuse NaN/Inf, rename
        it into place."""
        config = self.config
        non_finite: dict[str, tuple[int, int]] = {}
        nsamples = len(calibration.samples) if calibration else 0
        self.reporter.start("writing score set", total=len(loaded.linear_layers))
        itemsize = 2 if config.score_dtype == "float16" else 4
        array_bytes = sum(a * b * itemsize for a, b in loaded.fingerprint.shapes.values())
        if stats is not None:
            array_bytes += sum(v.numel() * 4 for v in stats.values())
        datasets = len(loaded.linear_layers) * (2 if stats is not None else 1)
        reserve = expected_file_bytes(array_bytes, datasets)
        with atomic_h5(final, reserve) as handle, contextlib.ExitStack() as parts:
            group_parts = self._open_group_parts(groups, last_group, parts)
            for lin in loaded.linear_layers:
                if lin.key in group_parts:
                    scores = group_parts[lin.key].read_raw(lin.key)
                elif last_group is not None:
                    scores = self._snip(lin, last_group, base_layers).cpu().numpy()
                else:
                    scores = self._layer_scores(lin, base_layers, stats, nsamples)
                nan, inf = non_finite_counts(scores)
                if nan or inf:
                    non_finite[lin.key] = (nan, inf)
                    continue
                if config.score_dtype == "float16":
                    write_array(handle, lin.key, to_float16_checked(scores, lin.key), "float16")
                else:
                    write_array(handle, lin.key, scores)
                if stats is not None:
                    mean_sq = (stats[lin.key].float() / float(nsamples)).cpu().numpy()
                    write_array(handle, f"{STATS_GROUP}/{lin.key}", mean_sq)
                self.reporter.advance()
            if non_finite:
                raise NonFiniteScoresError(
                    f"score set {self.name!r} not written: non-finite scores in "
                    f"{len(non_finite)} modules ({format_non_finite(non_finite)}); "
                    "use --dtype float32, or check the model and data"
                )
            meta["finished"] = now_iso()
            set_root_attrs(handle, SCORES_FORMAT, meta)
        self.reporter.finish()

    def _open_group_parts(
        self,
        groups: list[list[LinearLayer]],
        last_group: GradientAccumulator | None,
        stack: contextlib.ExitStack,
    ) -> dict[str, StoredFile]:
        """key -> the open part file holding it, for the wandg groups saved as parts."""
        if self.config.method != "wandg":
            return {}
        by_key: dict[str, StoredFile] = {}
        for index, group in enumerate(groups[:-1] if last_group is not None else groups):
            part = open_part(self._group_part(index))
            if part is None:
                raise StoreError(
                    f"layer group {index} of {self.name!r} was damaged before assembly and "
                    "removed: run the same command again to recompute it"
                )
            stack.enter_context(part)
            by_key.update({lin.key: part for lin in group})
        return by_key

    def _layer_scores(
        self,
        lin: LinearLayer,
        base_layers: dict[str, LinearLayer] | None,
        stats: dict[str, torch.Tensor] | None,
        nsamples: int,
    ) -> np.ndarray:
        """Scores computed at assembly: wanda from its statistics, magnitude, random."""
        method = self.config.method
        if method == "random":
            return random_scores(lin.shape, self.config.seed, lin.key).numpy()
        base = base_layers[lin.key].weight_matrix() if base_layers else None
        magnitude = weight_magnitude(lin.weight_matrix(), base)
        if method == "wanda":
            assert stats is not None
            return (
                wanda_scores(magnitude, stats[lin.key].to(magnitude.device), nsamples).cpu().numpy()
            )
        return magnitude.cpu().numpy()


def run_score(
    config: ScoreConfig,
    *,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
    loaded: LoadedModel | None = None,
) -> ScoreResult:
    """Compute a score set as `config` says and write it to the store."""
    return ScoreRun(config, reporter=reporter, command_line=command_line, loaded=loaded).run()
