"""The settings of the commands that read what other commands stored: `report` (a study's
table and figures), `inspect` (a store's contents) and `import-legacy` (the reference's
pickles into a store)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path

from wandacli.config.declare import nested, option
from wandacli.config.evaluation import RESULTS_DIR
from wandacli.config.settings import DEFAULT_STORE, ModelSpec
from wandacli.core.errors import ConfigError


@dataclass(frozen=True)
class ReportConfig:
    """Everything `wandacli report` needs."""

    results: Path = option(
        RESULTS_DIR,
        "results",
        metavar="RESULTS",
        help="Results directory: one subdirectory per model under test.",
        argument=True,
    )
    markdown_file: Path | None = option(
        None,
        "--markdown",
        help="Also write the table, and the figures of --plots embedded, as a Markdown document.",
    )
    plots: Path | None = option(
        None,
        "--plots",
        help="Draw the study's figures into this folder, as PNG and SVG: ASR against "
        "perplexity, ASR and perplexity against sparsity, and the Jaccard heatmaps of --compare.",
    )
    compare_dir: Path | None = option(
        None,
        "--compare",
        help="Folder of `wandacli compare --csv` files: one Jaccard heatmap per pair (with --plots).",
    )
    searches: Path | None = option(
        None,
        "--searches",
        metavar="STORE",
        help="Also report the store's searches: each front as a table (in --markdown) and a "
        "figure (with --plots).",
    )

    def __post_init__(self) -> None:
        if self.compare_dir is not None and self.plots is None:
            raise ConfigError("--compare draws heatmaps: give --plots DIR too")


@dataclass(frozen=True)
class InspectConfig:
    """`wandacli inspect --store STORE` (or `inspect STORE`, as before --store existed)."""

    store: Path = option(DEFAULT_STORE, "--store", "-s", help="Store directory.", panel="Store")
    # The store as an argument: every other command takes --store; this spelling is kept.
    store_argument: Path | None = option(
        None,
        "store_argument",
        metavar="STORE",
        help="The store directory (same as --store).",
        argument=True,
    )

    verify: bool = option(
        False,
        "--verify",
        help="Read every array of every finished file, checking each checksum (the whole store "
        "is read: minutes for a 7B model's sets); a damaged file is listed as such.",
    )

    def __post_init__(self) -> None:
        given = self.store_argument
        if given is not None and self.store != DEFAULT_STORE and self.store != given:
            raise ConfigError(
                f"inspect {given} --store {self.store}: two stores given; pass one of them"
            )

    @property
    def root(self) -> Path:
        return self.store_argument if self.store_argument is not None else self.store


@dataclass(frozen=True)
class LegacyImportConfig:
    """Everything `wandacli import-legacy` needs."""

    directory: Path = option(
        MISSING,
        "directory",
        metavar="DIRECTORY",
        help="The reference's --save folder (or its wanda_score/) holding W_metric_*.pkl dumps.",
        argument=True,
    )
    # Only its config is read (the shapes): no dtype or device to choose.
    model: ModelSpec = nested(
        ModelSpec,
        overrides={"model": {"help": "The model the dumps were computed on (shapes are checked)."}},
        only=("model", "cache_dir"),
    )
    store: Path = option(DEFAULT_STORE, "--store", "-s", help="Store directory.", panel="Store")
    name: str = option("imported", "--name", help="Score set name to write.")
    suffix: str | None = option(
        None,
        "--suffix",
        help="Which dumps when several exist, e.g. weight or align_weight_only_disentangle.",
    )
    method: str | None = option(
        None, "--method", help="Record this method [default: inferred from the file names]."
    )
    negate: bool = option(
        False,
        "--negate",
        help="Flip the sign (dumps made with --neg_prune hold negated scores).",
    )
    overwrite: bool = option(
        False, "--overwrite", help="Replace an existing result of the same name."
    )
