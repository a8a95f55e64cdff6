"""`wandacli compare`: which comparison the inputs call for, computed and its figures written
(CSV, JSON); the command draws and prints it."""

from __future__ import annotations

from typing import Any

from wandacli.config.compare import CompareConfig
from wandacli.core.errors import ConfigError
from wandacli.core.paths import plot_format


def run_compare(config: CompareConfig, *, reporter: Any = None) -> Any:
    """A Comparison (masks, score sets), a SubspaceComparison (rank statistics), or a
    DirectionCosines / DirectionInSubspaces (the direction level), by what the inputs are."""
    from wandacli.analysis import directions
    from wandacli.analysis.compare import compare_files
    from wandacli.analysis.subspaces import (
        are_rank_statistics,
        compare_rank_statistics,
        parse_ranks,
    )

    inputs, store = config.inputs, config.store
    if config.plot is not None:
        plot_format(config.plot)  # a bad file name fails before the comparison is computed
    kind = directions.comparison_kind(inputs, store)
    if kind == "cosines":
        cosines = directions.direction_cosines(
            inputs[0], inputs[1], store_root=store, position=config.position
        )
        directions.write_rows(cosines.rows(), config.csv_file, config.json_file, cosines.to_json())
        return cosines
    if kind is not None:
        if config.model is None:
            raise ConfigError(
                "a direction against rank statistics needs --model (its weights give each "
                "module's output subspace)"
            )
        shares = directions.direction_in_subspaces(
            inputs[0], inputs[1], store_root=store, model=config.model,
            rank=parse_ranks(config.ranks)[0],
        )  # fmt: skip
        directions.write_rows(shares.rows(), config.csv_file, config.json_file, shares.to_json())
        return shares
    if are_rank_statistics(inputs, store):
        return compare_rank_statistics(
            inputs,
            store_root=store,
            model=config.model,
            ranks=config.ranks,
            grid=config.rank_grid,
            csv_file=config.csv_file,
            json_file=config.json_file,
            reporter=reporter,
        )
    return compare_files(
        inputs,
        store_root=store,
        top=config.top,
        per_row=config.per_row,
        sample=config.sample,
        seed=config.seed,
        reporter=reporter,
        csv_file=config.csv_file,
        json_file=config.json_file,
    )
