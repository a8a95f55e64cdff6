"""`compare` at the direction level.

- Two mean-activations sets (harmful, harmless): the candidate directions
  r_l = normalise(μ_harmful[l, p] − μ_harmless[l, p]) of every residual stream l at one prompt
  position p, and their cosine similarities r_aᵀ r_b across layers (a [L+1, L+1] heatmap):
  where the refusal direction is one direction, neighbouring layers' candidates agree.
- A direction edit and a rank-statistics set: per module that writes into the residual stream,
  φ(r, V_s) = ‖V_sᵀ r‖², the share of r's norm inside the top-r_s output subspace of that
  module on the set's data (1: r lies in it; about r_s / d_model for a random direction) —
  whether the direction and the rank level point at the same part of the stream.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ConfigError
from wandacli.store.files import (
    EditFile,
    open_mean_activations,
    open_rank_statistics,
    resolve_file,
    stored_format,
)
from wandacli.store.schema import DIRECTION_DATASET, EDIT_FORMAT, MEANS_FORMAT, RANK_STATS_FORMAT


def comparison_kind(inputs: list[str], store_root: Path | None) -> str | None:
    """ "cosines" for two mean-activations sets, "subspaces" for a direction edit and a
    rank-statistics set, None for every other pair (masks, score sets, rank statistics)."""
    if len(inputs) != 2:
        return None

    def kind(reference: str, folder: str) -> str | None:
        try:
            return stored_format(resolve_file(reference, store_root, folder))
        except Exception:  # not there or not of this kind: the other comparisons say why
            return None

    first, second = kind(inputs[0], "score set"), kind(inputs[1], "score set")
    if first == MEANS_FORMAT and second == MEANS_FORMAT:
        return "cosines"
    if kind(inputs[0], "edit") == EDIT_FORMAT and second == RANK_STATS_FORMAT:
        return "subspaces"
    if MEANS_FORMAT in (first, second):
        raise ConfigError(
            "a mean-activations set compares with another (the candidate directions' cosines "
            "across layers); a direction edit with rank statistics: give EDIT ACTSVD-SET"
        )
    return None


@dataclass
class DirectionCosines:
    harmful: str
    harmless: str
    position: int
    cosines: np.ndarray  # [L+1, L+1], NaN where a candidate is zero

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "layer_a": a,
                "layer_b": b,
                "position": self.position,
                "cosine": None if math.isnan(v) else float(v),
            }  # fmt: skip
            for a, row in enumerate(self.cosines)
            for b, v in enumerate(row)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "harmful": self.harmful,
            "harmless": self.harmless,
            "position": self.position,
            "cosines": [[None if math.isnan(v) else float(v) for v in row] for row in self.cosines],
        }


@dataclass
class DirectionInSubspaces:
    edit: str
    statistics: str
    rank: int
    values: dict[str, float] = field(default_factory=dict)  # writer key -> φ

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "edit": self.edit,
                "statistics": self.statistics,
                "layer": key.split("/", 1)[0],
                "module": key.split("/", 1)[1],
                "rank": self.rank,
                "share": value,
            }  # fmt: skip
            for key, value in self.values.items()
        ]

    def to_json(self) -> dict[str, Any]:
        return {"edit": self.edit, "statistics": self.statistics, "rank": self.rank,
                "values": self.values}  # fmt: skip


def direction_cosines(
    harmful: str, harmless: str, *, store_root: Path | None, position: int
) -> DirectionCosines:
    """The candidates of every layer at `position` (from the end) and their cosines."""
    with (
        open_mean_activations(harmful, store_root) as a,
        open_mean_activations(harmless, store_root) as b,
    ):
        if not -a.positions <= position <= -1:
            raise ConfigError(
                f"--position {position}: the sets hold the last {a.positions} positions, "
                f"use -{a.positions}..-1"
            )
        mismatch = a.fingerprint.first_mismatch(b.fingerprint, mine=harmful, theirs=harmless)
        if mismatch or a.positions != b.positions:
            raise ConfigError(
                f"{harmful} and {harmless} are means of different models or positions: "
                f"{mismatch or 'positions differ'}"
            )
        index = a.positions + position
        difference = a.means()[:, index] - b.means()[:, index]  # [L+1, d]
    norms = np.linalg.norm(difference, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(norms > 0, difference / norms, np.nan)
    return DirectionCosines(harmful, harmless, position, unit @ unit.T)


def direction_in_subspaces(
    edit: str, statistics: str, *, store_root: Path | None, model: ModelSpec, rank: int
) -> DirectionInSubspaces:
    """‖V_sᵀ r‖² per writer module, V_s the top-`rank` output directions on the set's data."""
    from wandacli.models.loader import load_model
    from wandacli.removal.direction import orthonormal
    from wandacli.removal.ranks import top_output_directions

    with EditFile(resolve_file(edit, store_root, "edit")) as direction_edit:
        if not direction_edit.has(DIRECTION_DATASET):  # only a direction stores one r
            raise ConfigError(f"{edit} is a {direction_edit.mode} edit, not a direction")
        r = orthonormal(torch.from_numpy(direction_edit.read_raw(DIRECTION_DATASET)))
        keys = list(direction_edit.keys)
    r = r.reshape(r.shape[0], -1)  # [d, K]: the share of the K directions' norm, averaged
    loaded = load_model(model)
    by_key = {lin.key: lin for lin in loaded.linear_layers}
    result = DirectionInSubspaces(edit, statistics, rank)
    with open_rank_statistics(statistics, store_root) as stats:
        stats.check_model(loaded.fingerprint, loaded.model_id)
        for key in keys:
            weight = by_key[key].weight_matrix().detach().double()
            if rank > min(weight.shape):
                raise ConfigError(f"--ranks {rank} is above {key}'s rank of {min(weight.shape)}")
            basis = top_output_directions(weight, torch.from_numpy(stats.read(key)), rank)
            result.values[key] = float(((basis.T @ r.to(basis.device)) ** 2).sum()) / r.shape[1]
    return result


def write_rows(rows: list[dict[str, Any]], csv_file: Path | None, json_file: Path | None,
               payload: dict[str, Any]) -> None:  # fmt: skip
    from wandacli.core.durable import atomic_write_text

    if csv_file is not None and rows:
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(csv_file, buffer.getvalue())
    if json_file is not None:
        atomic_write_text(json_file, json.dumps(payload, indent=1))
