"""One class per `score --method`: what it gathers per sample, how that state is checkpointed
and summed across ranks, and how it becomes arrays in the store. `score_run.ScoreRun` runs any
of them: it owns the lock, the resume, the sample loop, checkpoints and the atomic assembly.

    magnitude, random   nothing to gather; scores computed layer by layer at assembly
    wanda               squared input norms per column (one forward per sample)
    wandg               |grad| sums per layer group (forward + backward per sample)
    actsvd              second moments Σ x xᵀ of each distinct input, per layer group: a
                        rank-statistics set (store.py), not scores
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from wandacli.console import warn
from wandacli.data import CalibrationSet
from wandacli.durable import expected_file_bytes
from wandacli.errors import StoreError
from wandacli.models import LinearLayer, LoadedModel
from wandacli.scoring import (
    ActivationStatistics,
    GradientAccumulator,
    SecondMoments,
    random_scores,
    shared_inputs,
    snip_scores,
    wanda_scores,
    weight_magnitude,
)
from wandacli.store import (
    RANK_STATS_FORMAT,
    SCORES_FORMAT,
    STATS_GROUP,
    StoredFile,
    open_part,
    write_part,
)

if TYPE_CHECKING:
    from wandacli.score_run import ScoreRun


@dataclass(frozen=True)
class LayerArray:
    """One array to write at assembly. `scores` arrays may be stored as float16 on request."""

    key: str
    array: np.ndarray
    is_scores: bool = False


@dataclass(frozen=True)
class LayerLink:
    """A second name for an array already written (an HDF5 hard link: stored once)."""

    key: str
    target: str


class ScoreMethod:
    """The parts of a score run that depend on the method. The defaults fit a method that
    gathers nothing and computes each layer's scores at assembly."""

    name: ClassVar[str]
    file_format: ClassVar[str] = SCORES_FORMAT

    def __init__(self, run: ScoreRun) -> None:
        self.run = run
        self.config = run.config

    def groups(self, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
        """Layer groups gathered one after another (each with its own pass over the data)."""
        return [layers]

    def settings(self) -> dict[str, Any]:
        """Settings beyond the run's own that change the numbers (a resume must match them)."""
        return {}

    def meta(self) -> dict[str, Any]:
        return {}

    def array_bytes(self, loaded: LoadedModel) -> int:
        """Bytes of the arrays the finished file holds."""
        itemsize = 2 if self.config.score_dtype == "float16" else 4
        return sum(a * b * itemsize for a, b in loaded.fingerprint.shapes.values())

    def datasets(self, loaded: LoadedModel) -> int:
        return len(loaded.linear_layers)

    def space_needed(self, loaded: LoadedModel) -> int:
        """Free space to ask for before starting: the finished file (and any parts beside it)."""
        return self.array_bytes(loaded)

    def gather(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
    ) -> None:
        """Every rank: run the samples, checkpointing as it goes."""

    @contextlib.contextmanager
    def assembling(self) -> Iterator[None]:
        """Around the assembly: parts opened for reading, closed after."""
        yield

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        raise NotImplementedError

    @staticmethod
    def magnitude(lin: LinearLayer, base_layers: dict[str, LinearLayer] | None) -> torch.Tensor:
        base = base_layers[lin.key].weight_matrix() if base_layers else None
        return weight_magnitude(lin.weight_matrix(), base)


class MagnitudeMethod(ScoreMethod):
    name = "magnitude"

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        yield LayerArray(lin.key, self.magnitude(lin, base_layers).cpu().numpy(), is_scores=True)


class RandomMethod(ScoreMethod):
    name = "random"

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        scores = random_scores(lin.shape, self.config.seed, lin.key).numpy()
        yield LayerArray(lin.key, scores, is_scores=True)


class WandaMethod(ScoreMethod):
    """|W| · sqrt(s): s, the squared input norms per column, gathered in one pass."""

    name = "wanda"

    def __init__(self, run: ScoreRun) -> None:
        super().__init__(run)
        self.sums: dict[str, torch.Tensor] = {}

    def array_bytes(self, loaded: LoadedModel) -> int:
        stats = sum(shape[1] * 4 for shape in loaded.fingerprint.shapes.values())
        return super().array_bytes(loaded) + stats

    def datasets(self, loaded: LoadedModel) -> int:
        return 2 * len(loaded.linear_layers)

    def space_needed(self, loaded: LoadedModel) -> int:
        return super().array_bytes(loaded)

    def gather(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
    ) -> None:
        assert calibration is not None
        run = self.run
        statistics = ActivationStatistics(loaded.linear_layers)
        done = run.dist.broadcast_int(
            run.restore(statistics.load, "stats-*.h5") if run.dist.is_main else 0
        )

        def observe(sample: Any) -> None:
            counted = sample.counted.to(loaded.input_device) if calibration.disentangle else None
            statistics.observe(loaded.model, sample.input_ids.to(loaded.input_device), counted)

        def checkpoint(step: int, *, reduced: bool = False) -> None:
            run.checkpoint(
                statistics.sums,
                f"stats-{step:06d}.h5",
                "stats-*.h5",
                {"samples": step, "kind": "wanda-sums"},
                reduced=reduced,
            )

        with statistics.recording():
            steps = run.sample_loop(calibration, done, "wanda: samples", observe, checkpoint)
        run.dist.all_reduce_sum(statistics.sums.values())
        if done < steps:  # keep every statistic before assembly
            checkpoint(steps, reduced=True)
        self.sums = statistics.sums

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        assert calibration is not None
        nsamples = len(calibration.samples)
        magnitude = self.magnitude(lin, base_layers)
        sums = self.sums[lin.key]
        scores = wanda_scores(magnitude, sums.to(magnitude.device), nsamples)
        yield LayerArray(lin.key, scores.cpu().numpy(), is_scores=True)
        mean_sq = (sums.float() / float(nsamples)).cpu().numpy()
        yield LayerArray(f"{STATS_GROUP}/{lin.key}", mean_sq)


class LayerGroupMethod(ScoreMethod):
    """A method gathered one layer group at a time (`--layers-per-pass`). Every group but the
    last is saved as a part (`group-<k>.h5`) and freed; the last stays in memory and goes
    straight into the file (its checkpoints cover it until the file is in place), saving a
    write and a read of up to the whole file's size."""

    kind: ClassVar[str]  # the checkpoint files' `kind` attribute

    def __init__(self, run: ScoreRun) -> None:
        super().__init__(run)
        self.group_parts: dict[str, StoredFile] = {}
        self._stack = contextlib.ExitStack()
        self.last: Any = None  # the last group's state, in memory
        self.groups_made: list[list[LinearLayer]] = []

    def groups(self, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
        per = self.config.layers_per_pass
        if per == 0:
            self.groups_made = [layers]
            return self.groups_made
        by_pass: dict[int, list[LinearLayer]] = {}
        for lin in layers:
            by_pass.setdefault(lin.layer // per, []).append(lin)
        self.groups_made = [by_pass[k] for k in sorted(by_pass)]
        return self.groups_made

    def settings(self) -> dict[str, Any]:
        return {"layers_per_pass": self.config.layers_per_pass}

    def meta(self) -> dict[str, Any]:
        return {"layers_per_pass": self.config.layers_per_pass}

    def group_part(self, index: int) -> Path:
        return self.run.parts_dir / f"group-{index:04d}.h5"

    # What a group gathers, and what its part holds: per method.
    def new_state(
        self, loaded: LoadedModel, group: list[LinearLayer], index: int, count: int
    ) -> Any:
        raise NotImplementedError

    def observe(
        self, state: Any, loaded: LoadedModel, calibration: CalibrationSet, sample: Any
    ) -> None:
        raise NotImplementedError

    def group_arrays(
        self, state: Any, group: list[LinearLayer], base_layers: dict[str, LinearLayer] | None
    ) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def group_bytes(self, group: list[LinearLayer]) -> int:
        raise NotImplementedError

    def settle(self, state: Any) -> None:
        """Bring the state's checkpointed sums up to date (before a checkpoint, and at the end
        of the samples); a no-op where every sample goes straight into them."""

    def gather(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
    ) -> None:
        assert calibration is not None
        for index, group in enumerate(groups):
            self.last = self._gather_group(
                loaded, calibration, group, index, len(groups), base_layers
            )

    def _gather_group(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet,
        group: list[LinearLayer],
        index: int,
        count: int,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Any:
        run = self.run
        last = index == count - 1
        group_path = self.group_part(index)
        finished = 0
        if not last and run.dist.is_main and group_path.exists():
            part = open_part(group_path)
            if part is not None:
                part.close()
                finished = 1
            else:
                warn(f"damaged part file {group_path}: removed, recomputing layer group {index}")
        if run.dist.broadcast_int(finished):
            return None
        state = self.new_state(loaded, group, index, count)
        pattern = f"accum-g{index:04d}-*.h5"
        done = run.dist.broadcast_int(run.restore(state.load, pattern) if run.dist.is_main else 0)
        label = (
            f"{self.name}: samples"
            if count == 1
            else f"{self.name}: layers {group[0].layer}-{group[-1].layer} ({index + 1}/{count})"
        )

        def checkpoint(step: int) -> None:
            self.settle(state)
            run.checkpoint(
                state.sums,
                f"accum-g{index:04d}-{step:06d}.h5",
                pattern,
                {"samples": step, "group": index, "kind": self.kind},
            )

        with state.recording():
            run.sample_loop(
                calibration,
                done,
                label,
                lambda sample: self.observe(state, loaded, calibration, sample),
                checkpoint,
            )
        self.settle(state)
        run.dist.all_reduce_sum(state.sums.values())
        if last:
            return state
        if run.dist.is_main:
            size = expected_file_bytes(self.group_bytes(group), len(group))
            arrays = self.group_arrays(state, group, base_layers)
            write_part(group_path, arrays, {"group": index, "kind": f"{self.name}-group"}, size)
            for stale in run.parts_dir.glob(pattern):
                stale.unlink(missing_ok=True)
        return None

    @contextlib.contextmanager
    def assembling(self) -> Iterator[None]:
        """The saved groups' parts, open for reading during assembly."""
        groups = self.groups_made[:-1] if self.last is not None else self.groups_made
        with self._stack:
            for index, group in enumerate(groups):
                part = open_part(self.group_part(index))
                if part is None:
                    raise StoreError(
                        f"layer group {index} of {self.run.name!r} was damaged before assembly "
                        "and removed: run the same command again to recompute it"
                    )
                self._stack.enter_context(part)
                self.group_parts.update({lin.key: part for lin in group})
            yield


class WandgMethod(LayerGroupMethod):
    """SNIP: |W| · Σ|∂L/∂W| over the samples, one layer group at a time."""

    name = "wandg"
    kind = "wandg-accumulators"

    def meta(self) -> dict[str, Any]:
        return super().meta() | {"offload_accumulators": self.config.offload_accumulators}

    def space_needed(self, loaded: LoadedModel) -> int:
        # Each group's scores are kept as a part until assembly: twice the set's size.
        return 2 * self.array_bytes(loaded)

    def new_state(
        self, loaded: LoadedModel, group: list[LinearLayer], index: int, count: int
    ) -> Any:
        return GradientAccumulator(group, offload=self.config.offload_accumulators)

    def observe(
        self, state: Any, loaded: LoadedModel, calibration: CalibrationSet, sample: Any
    ) -> None:
        if sample.num_counted > 0:  # a sample with no counted token has no loss
            input_ids = sample.input_ids.to(loaded.input_device)
            state.observe(loaded.model, input_ids, sample.labels.to(loaded.input_device))

    def _snip(
        self,
        lin: LinearLayer,
        state: GradientAccumulator,
        base_layers: dict[str, LinearLayer] | None,
    ) -> torch.Tensor:
        magnitude = self.magnitude(lin, base_layers)
        return snip_scores(magnitude, state.scores_layout(lin).to(magnitude.device))

    def group_arrays(
        self, state: Any, group: list[LinearLayer], base_layers: dict[str, LinearLayer] | None
    ) -> Iterator[tuple[str, np.ndarray]]:
        return ((lin.key, self._snip(lin, state, base_layers).cpu().numpy()) for lin in group)

    def group_bytes(self, group: list[LinearLayer]) -> int:
        return sum(lin.shape[0] * lin.shape[1] * 4 for lin in group)

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        if lin.key in self.group_parts:
            scores = self.group_parts[lin.key].read_raw(lin.key)
        else:
            scores = self._snip(lin, self.last, base_layers).cpu().numpy()
        yield LayerArray(lin.key, scores, is_scores=True)


class ActSvdMethod(LayerGroupMethod):
    """Rank statistics: per distinct linear input, C = (1/N) Σ x xᵀ over the counted tokens,
    from which any rank edit of ActSVD follows (ranks.py)."""

    name = "actsvd"
    kind = "actsvd-second-moments"
    file_format = RANK_STATS_FORMAT

    def __init__(self, run: ScoreRun) -> None:
        super().__init__(run)
        self.owners: dict[str, str] = {}
        self.counted_tokens = 0

    def _owners(self, loaded: LoadedModel) -> dict[str, str]:
        if not self.owners:
            self.owners = shared_inputs(loaded.model, loaded.linear_layers, loaded.input_device)
        return self.owners

    def meta(self) -> dict[str, Any]:
        return super().meta() | {
            "shared_inputs": {k: v for k, v in self.owners.items() if k != v},
            "counted_tokens": self.counted_tokens,
        }

    def array_bytes(self, loaded: LoadedModel) -> int:
        owners = self._owners(loaded)
        return sum(
            lin.shape[1] * lin.shape[1] * 4
            for lin in loaded.linear_layers
            if owners[lin.key] == lin.key
        )

    def space_needed(self, loaded: LoadedModel) -> int:
        return 2 * self.array_bytes(loaded)

    def settle(self, state: Any) -> None:
        state.flush()  # the float32 blocks into the float64 sums

    def new_state(
        self, loaded: LoadedModel, group: list[LinearLayer], index: int, count: int
    ) -> Any:
        # Every group but the last stops its forward pass after its own last layer.
        return SecondMoments(group, self._owners(loaded), stop_early=index < count - 1)

    def observe(
        self, state: Any, loaded: LoadedModel, calibration: CalibrationSet, sample: Any
    ) -> None:
        counted = sample.counted.to(loaded.input_device) if calibration.disentangle else None
        state.observe(loaded.model, sample.input_ids.to(loaded.input_device), counted)

    def group_arrays(
        self, state: Any, group: list[LinearLayer], base_layers: dict[str, LinearLayer] | None
    ) -> Iterator[tuple[str, np.ndarray]]:
        self.counted_tokens = state.tokens
        for lin in state.readers:
            yield lin.key, state.second_moment(lin.key).float().cpu().numpy()

    def group_bytes(self, group: list[LinearLayer]) -> int:
        return sum(
            lin.shape[1] ** 2 * 4 for lin in group if self.owners.get(lin.key, lin.key) == lin.key
        )

    def gather(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
    ) -> None:
        self._owners(loaded)
        super().gather(loaded, calibration, base_layers, groups)
        if self.last is not None:
            self.counted_tokens = self.last.tokens

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        owner = self.owners[lin.key]
        if owner != lin.key:
            yield LayerLink(lin.key, owner)
        elif lin.key in self.group_parts:
            yield LayerArray(lin.key, self.group_parts[lin.key].read_raw(lin.key))
        else:
            yield LayerArray(lin.key, self.last.second_moment(lin.key).float().cpu().numpy())


METHOD_CLASSES: dict[str, type[ScoreMethod]] = {
    cls.name: cls for cls in (WandaMethod, WandgMethod, MagnitudeMethod, RandomMethod, ActSvdMethod)
}


def score_method(run: ScoreRun) -> ScoreMethod:
    return METHOD_CLASSES[run.config.method](run)
