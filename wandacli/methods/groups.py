"""Methods that gather per layer group, with checkpoints of their sums."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from wandacli.core.console import warn
from wandacli.core.durable import expected_file_bytes
from wandacli.core.errors import StoreError
from wandacli.data.calibration import CalibrationSet
from wandacli.methods.base import RunContext, ScoreMethod
from wandacli.models.layers import LinearLayer
from wandacli.models.pretrained import LoadedModel
from wandacli.store.files import StoredFile
from wandacli.store.parts import open_part, write_part

# The two newest checkpoints are kept (the previous one covers a damaged newest one) while the
# next is written.
CHECKPOINTS_AT_ONCE = 3


class LayerGroupMethod(ScoreMethod):
    """A method gathered one layer group at a time (`--layers-per-pass`). Every group but the
    last is saved as a part (`group-<k>.h5`) and freed; the last stays in memory and goes
    straight into the file (its checkpoints cover it until the file is in place), saving a
    write and a read of up to the whole file's size."""

    kind: ClassVar[str]  # the checkpoint files' `kind` attribute

    def __init__(self, run: RunContext) -> None:
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

    def checkpoint_bytes(self, group: list[LinearLayer]) -> int:
        """Bytes of one checkpoint of a group's sums (float32 by default)."""
        return self.group_bytes(group)

    def space_needed(self, loaded: LoadedModel) -> int:
        """What the run holds on disk at its peak: the finished groups' parts and the set
        assembled from them (together, at the end), beside the checkpoints of the largest
        group: the two newest kept and a third being written (scoring.run's checkpoint)."""
        groups = self.groups(loaded.linear_layers)
        checkpoints = (
            CHECKPOINTS_AT_ONCE * max(self.checkpoint_bytes(g) for g in groups)
            if self.config.checkpoint_interval
            else 0
        )
        return 2 * self.array_bytes(loaded) + checkpoints

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
