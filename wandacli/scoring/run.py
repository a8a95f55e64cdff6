"""A resumable `score` run: load, gather statistics sample by sample with checkpoints, assemble
the score set, clean up.

Work in progress lives in `scores/<set>.parts/` (see store/schema.py). Killing a run keeps what it
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
from pathlib import Path
from typing import Any, Literal

import torch

from wandacli.config.score import ScoreConfig, score_request
from wandacli.config.settings import DEFAULT_SEQLEN_CAP, ModelSpec
from wandacli.core import distributed
from wandacli.core.console import NullReporter, Reporter, info, warn
from wandacli.core.durable import (
    check_free_space,
    ensure_writable_directory,
    expected_file_bytes,
)
from wandacli.core.errors import (
    ModelError,
    NonFiniteScoresError,
    ResumeMismatchError,
    interruptible,
)
from wandacli.core.memory import peak_gpu_bytes, peak_rss_bytes, return_freed_memory_promptly
from wandacli.core.provenance import (
    now_iso,
    refuse_other_request,
    request_differences,
    software_versions,
)
from wandacli.data.calibration import CalibrationSet, indices_digest
from wandacli.data.sources import data_display_name, load_raw, named_set
from wandacli.methods.base import ScoreMethod
from wandacli.methods.registry import score_method
from wandacli.models.layers import LinearLayer
from wandacli.models.loader import load_model
from wandacli.models.pretrained import LoadedModel, model_max_length
from wandacli.models.sources import DTYPES
from wandacli.scoring.result import ScoreResult
from wandacli.store.assemble import assemble, format_non_finite
from wandacli.store.files import open_finished_scores
from wandacli.store.lock import writer_lock
from wandacli.store.parts import check_resumable, read_part, write_manifest, write_part
from wandacli.store.schema import Store


class ScoreRun:
    """One `wandacli score` invocation: the lock, resume, the sample loop with checkpoints and
    the atomic assembly, for any method (methods/ holds what differs between them)."""

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
        self.method: ScoreMethod = score_method(self)

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
            writer_lock(self.store.root, f"scores/{self.name}", shlex.join(self.command_line))
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
                    with open_finished_scores(final) as finished:
                        complete = self._already_complete(finished, started)
                return complete
            loaded = self._loaded or load_model(self._rank_model_spec())
            calibration = self._calibration(loaded) if config.needs_data else None
            base_layers = self._base_layers(loaded) if config.use_diff else None
            settings = self._settings(loaded, calibration, base_layers)
            groups = self.method.groups(loaded.linear_layers)
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

    def _recorded_config(self) -> dict[str, Any]:
        """The settings as the set records them: the dtype the model is loaded in, not the
        word `auto`."""
        from wandacli.models.loader import resolved_dtype

        data = self.config.to_json()
        data["model"]["dtype"] = resolved_dtype(self.config.model)
        return data

    def _request(self) -> dict[str, Any]:
        return score_request(self._recorded_config())

    def _finished_set_with_same_request(self, final: Path) -> ScoreResult:
        """The finished set as this run's result when it was asked for with the same settings
        (and its data file still has the same content); refuses, naming what differs, when not."""
        config = self.config
        with open_finished_scores(final) as finished:
            differences = request_differences(finished.meta, self._request(), score_request)
            if not differences and config.needs_data and config.data:
                stored_sha = (finished.meta.get("data") or {}).get("sha256")
                raw = load_raw(
                    config.data,
                    purpose=self._data_purpose(),
                    columns=config.columns,
                    directory=config.data_dir,
                )
                if raw.content_hash != stored_sha:
                    differences = [
                        f"data_sha256: {str(stored_sha)[:12]}… → {raw.content_hash[:12]}… "
                        f"({raw.source})"
                    ]
            refuse_other_request("score set", self.name, self.store.root, differences)
            return self._already_complete(finished, time.monotonic())

    def _already_complete(self, finished: Any, started: float) -> ScoreResult:
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
        raw = load_raw(
            config.data,
            purpose=self._data_purpose(),
            columns=config.columns,
            directory=config.data_dir,
        )
        max_len = model_max_length(loaded.model)
        seqlen = config.seqlen or min(DEFAULT_SEQLEN_CAP, max_len or DEFAULT_SEQLEN_CAP)
        if max_len is not None and seqlen > max_len:
            raise ModelError(
                f"--seqlen {seqlen} exceeds the model's context of {max_len}: use --seqlen {max_len} or less"
            )
        return self.method.calibration(raw, loaded.tokenizer, config, seqlen)

    def _data_purpose(self) -> Literal["calibration", "prompts"]:
        """Mean activations read prompts: a prompt set or a text file of prompts (one a line)
        is read as prompts; everything else as calibration data (a pair set's prompts)."""
        data = self.config.data or ""
        if self.config.method != "mean-activations":
            return "calibration"
        entry = named_set(data)
        if entry is not None:
            return "prompts" if entry.kind == "prompts" else "calibration"
        return "prompts" if Path(data).suffix.lower() in (".txt", ".text") else "calibration"

    def _base_layers(self, loaded: LoadedModel) -> dict[str, LinearLayer]:
        config = self.config
        assert config.base_model is not None
        # The base model stays on the CPU: only its weights are read, one layer at a time. It
        # is read in the model's own dtype, not the --dtype string: `auto` is bfloat16 on CUDA
        # but float32 on the CPU, and a difference of weights rounded on one side only would
        # carry that rounding (up to ~2^-9·|W|), as large as the differences it measures.
        dtype = str(loaded.dtype).removeprefix("torch.")
        base = load_model(
            ModelSpec(
                model=config.base_model,
                dtype=dtype if dtype in DTYPES else config.model.dtype,
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
        settings.update(self.method.settings())
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
            "config": self._recorded_config(),
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
        meta["world_size"] = self.dist.world_size
        return meta

    def _check_space(self, loaded: LoadedModel, final: Path) -> None:
        needed = self.method.space_needed(loaded)
        check_free_space(
            self.store.root, needed, f"{self._noun()} {self.name!r}, its parts and checkpoints"
        )

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
        self.method.gather(loaded, calibration, base_layers, groups)
        if self.dist.is_main:
            self._assemble(loaded, calibration, base_layers, final, meta)

    def sample_loop(
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

    def restore(self, load: Any, pattern: str) -> int:
        """Load the latest readable checkpoint matching `pattern`; returns the steps it covers."""
        for path in sorted(self.parts_dir.glob(pattern), reverse=True):
            part = read_part(path)
            if part is None:
                warn(f"damaged part file {path}: removed, recomputing what it held")
                continue
            arrays, attrs = part
            load({k: torch.from_numpy(v) for k, v in arrays.items()})
            return int(attrs["samples"])
        return 0

    def checkpoint(
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
            # In place, then only rank 0 keeps the total and the others sum on from zero: the
            # sums stay additive across ranks (as after a resume, where rank 0 alone restores
            # a checkpoint), and no second copy of every sum is made on the device.
            self.dist.all_reduce_sum(sums.values())
            if not self.dist.is_main:
                for value in sums.values():
                    value.zero_()
        if not self.dist.is_main:
            return
        arrays = ((k, v.detach().cpu().numpy()) for k, v in sums.items())
        size = expected_file_bytes(
            sum(v.numel() * v.element_size() for v in sums.values()), len(sums)
        )
        write_part(self.parts_dir / name, arrays, attrs, size)
        # Keep only the newest two checkpoints: the previous one covers a damaged newest one.
        for older in sorted(self.parts_dir.glob(pattern))[:-2]:
            older.unlink(missing_ok=True)

    # -- assembly -------------------------------------------------------------------------

    def _assemble(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        final: Path,
        meta: dict[str, Any],
    ) -> None:
        """Write the file to a temporary name one layer at a time, refuse NaN/Inf, rename it
        into place."""
        method = self.method
        values = "scores" if method.noun == "score set" else "values"

        def finished_meta() -> dict[str, Any]:
            meta.update(method.meta())
            meta["finished"] = now_iso()
            return meta

        def refusal(non_finite: dict[str, tuple[int, int]]) -> Exception:
            return NonFiniteScoresError(
                f"{self._noun()} {self.name!r} not written: non-finite {values} in "
                f"{len(non_finite)} modules ({format_non_finite(non_finite)}); "
                "use --dtype float32, or check the model and data"
            )

        with method.assembling():
            groups, total = method.assembly(loaded, calibration, base_layers)
            assemble(
                final,
                groups,
                total=total,
                reserve_bytes=expected_file_bytes(
                    method.array_bytes(loaded), method.datasets(loaded)
                ),
                file_format=method.file_format,
                meta=finished_meta,
                non_finite_error=refusal,
                reporter=self.reporter,
                label=f"writing {self._noun()}",
                float16_scores=self.config.score_dtype == "float16",
            )

    def _noun(self) -> str:
        return self.method.noun


def run_score(
    config: ScoreConfig,
    *,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
    loaded: LoadedModel | None = None,
) -> ScoreResult:
    """Compute a score set as `config` says and write it to the store."""
    return ScoreRun(config, reporter=reporter, command_line=command_line, loaded=loaded).run()
