"""What every `score --method` shares. Each method is a class in its own file: what it gathers
per sample, how that state is checkpointed and summed across ranks, and how it becomes arrays
in the store. `scoring.run.ScoreRun` runs any of them through the RunContext protocol declared
here; the run owns the lock, the resume, the sample loop, checkpoints and the atomic assembly.

    magnitude, random   nothing to gather; scores computed layer by layer at assembly
    wanda               squared input norms per column (one forward per sample)
    wandg               |grad| sums per layer group (forward + backward per sample)
    actsvd              second moments Σ x xᵀ of each distinct input, per layer group: a
                        rank-statistics set (store/schema.py), not scores
    mean-activations    residual-stream sums at the last K prompt positions (one forward per
                        prompt): a mean-activations set, one array
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from wandacli.config.score import ScoreConfig
from wandacli.data.calibration import CalibrationSet, build_calibration_set
from wandacli.data.sources import RawData
from wandacli.models.layers import LinearLayer
from wandacli.models.pretrained import LoadedModel
from wandacli.store.assemble import LayerArray, LayerLink
from wandacli.store.schema import SCORES_FORMAT


class Collective(Protocol):
    """The process group as a method sees it (core.distributed.Distributed implements it)."""

    @property
    def is_main(self) -> bool: ...

    def all_reduce_sum(self, tensors: Iterable[Any]) -> None: ...

    def broadcast_int(self, value: int) -> int: ...


class RunContext(Protocol):
    """What a score run offers the method it runs (scoring.run.ScoreRun implements it): the
    settings, the set's name and parts directory, the process group, and the run's generic
    sample loop, checkpoints and restore. Methods call these; they never import the run."""

    config: ScoreConfig
    name: str
    parts_dir: Path

    @property
    def dist(self) -> Collective: ...

    def sample_loop(
        self,
        calibration: CalibrationSet,
        done: int,
        label: str,
        observe: Callable[[Any], None],
        checkpoint: Callable[[int], None],
    ) -> int: ...

    def restore(self, load: Callable[[dict[str, torch.Tensor]], None], pattern: str) -> int: ...

    def checkpoint(
        self,
        sums: dict[str, torch.Tensor],
        name: str,
        pattern: str,
        attrs: dict[str, Any],
        *,
        reduced: bool = False,
    ) -> None: ...


class ScoreMethod:
    """The parts of a score run that depend on the method. The defaults fit a method that
    gathers nothing and computes each layer's scores at assembly."""

    name: ClassVar[str]
    file_format: ClassVar[str] = SCORES_FORMAT
    noun: ClassVar[str] = "score set"  # what messages call the finished file

    def __init__(self, run: RunContext) -> None:
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

    def calibration(
        self, raw: RawData, tokenizer: Any, config: ScoreConfig, seqlen: int
    ) -> CalibrationSet:
        """The samples this method reads: the reference's calibration samples by default."""
        return build_calibration_set(
            raw,
            tokenizer,
            nsamples=config.nsamples,
            seed=config.seed,
            seqlen=seqlen,
            disentangle=not config.entangle,
            template=config.template,
        )

    def assembly(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> tuple[Iterator[Iterable[LayerArray | LayerLink]], int]:
        """What the finished file holds, one progress step per group, and the number of
        groups: by default each linear layer's arrays."""
        groups = (self.layer_arrays(lin, calibration, base_layers) for lin in loaded.linear_layers)
        return groups, len(loaded.linear_layers)

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


# ---------------------------------------------------------------------------------------------
# Pure math


def weight_magnitude(weight: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """|W| (or |W - W_base|) in float32."""
    weight = weight.detach().float()
    if base_weight is not None:
        return (weight - base_weight.detach().to(weight.device).float()).abs_()
    return weight.abs()
