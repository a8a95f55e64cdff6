"""The reference's --sequential order: second moments recorded layer by layer after the
layers before were edited."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wandacli.core.errors import StoreError
from wandacli.store.files import (
    RankStatistics,
)
from wandacli.store.schema import split_key


class SequentialMoments:
    """The reference's order: each decoder layer's second moments recorded with the layers
    before it already edited, from the calibration samples the rank-statistics sets were made
    from (rebuilt from their recorded settings; a changed data file is refused)."""

    def __init__(self, loaded: Any, safety: RankStatistics, utility: RankStatistics | None) -> None:
        from wandacli.methods.actsvd import shared_inputs

        self.loaded = loaded
        self.owners = shared_inputs(loaded.model, loaded.linear_layers, loaded.input_device)
        self.calibration = {
            statistics.name: _calibration_of(statistics, loaded.tokenizer)
            for statistics in (safety, *([utility] if utility else []))
        }
        self._layer: int | None = None
        self._moments: dict[str, Any] = {}

    def second_moment(self, statistics: RankStatistics, key: str) -> torch.Tensor:
        layer = split_key(key)[0]
        if layer != self._layer:
            self._record(layer)
        return self._moments[statistics.name].second_moment(key)

    def _record(self, layer: int) -> None:
        from wandacli.methods.actsvd import SecondMoments

        loaded = self.loaded
        group = [lin for lin in loaded.linear_layers if lin.layer == layer]
        self._moments = {}
        for name, calibration in self.calibration.items():
            moments = SecondMoments(group, self.owners, stop_early=True)
            with moments.recording():
                for sample in calibration.samples:
                    counted = (
                        sample.counted.to(loaded.input_device) if calibration.disentangle else None
                    )
                    moments.observe(loaded.model, sample.input_ids.to(loaded.input_device), counted)
            self._moments[name] = moments
        self._layer = layer

    @staticmethod
    def apply(lin: Any, kind: Any, bases: dict[str, torch.Tensor]) -> None:
        """This layer's edit in place (`kind`'s formula), before the next is recorded."""
        matrix = lin.weight_matrix()
        new = kind.edited_weight(matrix, bases).to(matrix.dtype)
        lin.set_matrix(new)  # in the module's own layout


def _calibration_of(statistics: RankStatistics, tokenizer: Any) -> Any:
    """The calibration samples a rank-statistics set was computed from, rebuilt from its meta."""
    from wandacli.config.settings import Columns
    from wandacli.data.calibration import build_calibration_set, indices_digest
    from wandacli.data.sources import load_raw

    meta = statistics.meta
    config = meta.get("config") or {}
    raw = load_raw(
        str(config["data"]),
        columns=Columns(**(config.get("columns") or {})),
        directory=Path(config["data_dir"]) if config.get("data_dir") else None,
    )
    recorded = meta.get("data") or {}
    if raw.content_hash != recorded.get("sha256"):
        raise StoreError(
            f"--sequential rebuilds {statistics.name}'s calibration samples, but its data "
            f"{config['data']} changed since (sha256 {str(recorded.get('sha256'))[:12]}… → "
            f"{raw.content_hash[:12]}…): recompute the set, or drop --sequential"
        )
    calibration = build_calibration_set(
        raw,
        tokenizer,
        nsamples=int(meta["nsamples"]),
        seed=int(meta["seed"]),
        seqlen=int(meta["seqlen"]),
        disentangle=bool(meta["disentangle"]),
        template=str(meta["template"]),
    )
    if indices_digest(calibration.indices) != indices_digest(list(recorded.get("indices") or [])):
        raise StoreError(
            f"--sequential could not rebuild {statistics.name}'s calibration samples (other "
            "sample indices): recompute the set with this wandacli"
        )
    return calibration
