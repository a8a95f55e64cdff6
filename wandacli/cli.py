"""The `wandacli` command line. Each command parses its options, calls one library function and
renders the result; `WandacliGroup` is the one place an error becomes a user message."""

from __future__ import annotations

import inspect as inspect_module
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from wandacli import __version__, render
from wandacli.config import (
    DEFAULT_MODEL_ALIAS,
    DEFAULT_STORE,
    AttackConfig,
    Columns,
    EditConfig,
    ModelSpec,
    PruneConfig,
    ScoreConfig,
    UtilityConfig,
    config_path_from_args,
    default_map,
    read_config_file,
    refuse_mask_flags_for_edits,
)
from wandacli.console import console, progress_reporter
from wandacli.data import describe_named_sets
from wandacli.distributed import rank_prefix
from wandacli.errors import ConfigError, Terminated, WandacliError
from wandacli.options import (
    CacheDirOption,
    ConfigOption,
    DataDirOption,
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    MaskOption,
    MaskStoreOption,
    MaxMemoryOption,
    ModelOption,
    NoProgressOption,
    OutOption,
    OverwriteOption,
    SeedOption,
    StoreOption,
    model_spec,
)
from wandacli.store import summarize_store

# Exit codes: 2 for usage and input errors (click's convention), 130/143 for SIGINT/SIGTERM.
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def _report(message: str) -> None:
    message = rank_prefix() + message
    # Messages name things like [score] tables: escape them so Rich prints them verbatim.
    console.print(
        f"[bold red]error:[/bold red] {escape(message)}",
        markup=True,
        highlight=False,
        soft_wrap=True,
    )


def _debug_enabled() -> bool:
    return os.environ.get("WANDACLI_DEBUG") == "1"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _tidy_help(command: Any) -> None:
    """Help text as Rich renders it: docstrings' hard line breaks joined within paragraphs (the
    command list shows each summary whole), and brackets in help strings escaped (Rich would
    read "[default: ...]" as markup and drop it)."""
    if command.help:
        paragraphs = inspect_module.cleandoc(command.help).split("\n\n")
        command.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        command.help = escape(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)


def _flags_without_metavar(params: list[Any]) -> list[Any]:
    """A flag takes no value: show no `<bool>` beside it (`--json <bool>` reads as if
    `--json true` were accepted)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class WandacliCommand(TyperCommand):
    """Every subcommand: tidy help text, flags without a metavar."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))


class WandacliGroup(TyperGroup):
    """Converts every error into one line on stderr and an exit code, for the console script
    and for CliRunner alike. A traceback only with --debug (or WANDACLI_DEBUG=1)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: leave SIGTERM alone
            previous = None
        try:
            return super().invoke(ctx)
        except WandacliError as exc:
            _report_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _report("interrupted")
            raise typer.Exit(EXIT_SIGINT) from None
        except Terminated:
            _report("terminated")
            raise typer.Exit(EXIT_SIGTERM) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:  # a bug: say so in one line, keep the trace for --debug
            _report_error(exc)
            raise typer.Exit(1) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))

    def options_by_command(self) -> dict[str, set[str]]:
        return {name: {p.name for p in cmd.params if p.name} for name, cmd in self.commands.items()}

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            config_path = config_path_from_args(argv)
            if config_path is not None:
                extra["default_map"] = default_map(
                    read_config_file(config_path), self.options_by_command()
                )
            result = super().main(
                args=argv,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except WandacliError as exc:
            _report_error(exc)
            code = exc.exit_code
        except typer.TyperException as exc:  # click's usage errors
            _report(_usage_message(exc))
            code = getattr(exc, "exit_code", EXIT_USAGE)
        except typer.Abort:
            _report("aborted")
            code = EXIT_SIGINT
        else:
            code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_message(exc: Any) -> str:
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(str(message).split())  # one line
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        return f"{message} (see `{ctx.command_path} --help`)"
    return message


def _report_error(exc: BaseException) -> None:
    if _debug_enabled():
        traceback.print_exception(exc)
    if isinstance(exc, WandacliError):
        _report(str(exc))
    else:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        _report(
            f"internal error: {type(exc).__name__}: {detail} "
            "(rerun with --debug for the traceback, and please report it)"
        )


app = typer.Typer(
    cls=WandacliGroup,
    name="wandacli",
    help=(
        "Find which weights of a chat model carry its safety behaviour: score every weight of "
        "every linear layer, keep the scores in an HDF5 store, prune from them, compare masks, "
        "and measure attack success and utility."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wandacli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """wandacli: safety attribution by pruning."""
    if debug:
        os.environ["WANDACLI_DEBUG"] = "1"


@app.command(cls=WandacliCommand)
def score(
    ctx: typer.Context,
    method: Annotated[
        Literal["wanda", "wandg", "magnitude", "random", "actsvd"] | None,
        typer.Option(
            "--method",
            help="wanda: |W|·‖X‖₂ over calibration inputs; wandg (SNIP): |W|·Σ|∇W| of the "
            "calibration loss; magnitude: |W|; random: seeded uniform; actsvd: rank statistics "
            "(each input's second moment Σxxᵀ/N) for rank edits, not per-weight scores.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            metavar="<NAME|FILE>",
            help="Calibration set: a named set or a CSV/JSON/JSONL/Parquet/TXT file. Named: "
            + describe_named_sets("calibration"),
            rich_help_panel="Data",
        ),
    ] = None,
    nsamples: Annotated[
        int, typer.Option("--nsamples", "-n", help="Calibration samples.", rich_help_panel="Data")
    ] = 128,
    seed: SeedOption = 0,
    store: StoreOption = DEFAULT_STORE,
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="Score set name [default: <method>-<data>].", rich_help_panel="Store"
        ),
    ] = None,
    seqlen: Annotated[
        int | None,
        typer.Option(
            "--seqlen",
            help="Longest sample in tokens [default: min(2048, model context)].",
            rich_help_panel="Data",
        ),
    ] = None,
    template: Annotated[
        Literal["raw", "chat"],
        typer.Option(
            "--template",
            help="raw: prompts as stored (the reference's Llama-2 [INST] text); chat: strip "
            "Llama-2 tags and apply the tokenizer's chat template.",
            rich_help_panel="Data",
        ),
    ] = "raw",
    entangle: Annotated[
        bool,
        typer.Option(
            "--entangle",
            help="Count every token of random seqlen-long windows instead of response tokens only.",
            rich_help_panel="Data",
        ),
    ] = False,
    prompt_column: Annotated[
        str, typer.Option("--prompt-column", rich_help_panel="Data")
    ] = "prompt",
    response_column: Annotated[
        str, typer.Option("--response-column", rich_help_panel="Data")
    ] = "response",
    text_column: Annotated[str, typer.Option("--text-column", rich_help_panel="Data")] = "text",
    data_dir: DataDirOption = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="The model before alignment, for --use-diff.",
            rich_help_panel="Model",
        ),
    ] = None,
    use_diff: Annotated[
        bool,
        typer.Option(
            "--use-diff", help="Score |W - W_base| in place of |W|.", rich_help_panel="Model"
        ),
    ] = False,
    layers_per_pass: Annotated[
        int,
        typer.Option(
            "--layers-per-pass",
            help="wandg, actsvd: decoder layers per pass over the data, to bound memory (0: all).",
        ),
    ] = 0,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            "--checkpoint-every",
            help="Samples between checkpoints (0: off) [default: wanda 8, wandg 32].",
        ),
    ] = None,
    score_dtype: Annotated[
        Literal["float32", "float16"],
        typer.Option(
            "--score-dtype",
            help="Stored precision; float16 halves the size and refuses values above 65504.",
            rich_help_panel="Store",
        ),
    ] = "float32",
    model: ModelOption = DEFAULT_MODEL_ALIAS,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_accumulators: Annotated[
        bool,
        typer.Option(
            "--offload-accumulators",
            help="wandg: keep the |grad| sums in CPU memory (GPU memory ≈ the model alone).",
        ),
    ] = False,
    cache_dir: CacheDirOption = None,
    overwrite: OverwriteOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Compute a score for every weight of every decoder linear layer and write a score set.

    Resumable: an interrupted run keeps its finished work; the same command resumes it.
    """
    p = ctx.params  # defaults < --config file < flags, resolved by the parser
    if p["method"] is None:
        raise ConfigError("--method is required: wanda, wandg, magnitude or random")
    score_config = ScoreConfig(
        method=p["method"],
        model=model_spec(p),
        data=p["data"],
        nsamples=p["nsamples"],
        seed=p["seed"],
        store=p["store"],
        name=p["name"],
        seqlen=p["seqlen"],
        template=p["template"],
        entangle=p["entangle"],
        base_model=p["base_model"],
        use_diff=p["use_diff"],
        overwrite=p["overwrite"],
        layers_per_pass=p["layers_per_pass"],
        checkpoint_every=p["checkpoint_every"],
        score_dtype=p["score_dtype"],
        columns=Columns(p["prompt_column"], p["response_column"], p["text_column"]),
        data_dir=p["data_dir"],
        offload_accumulators=p["offload_accumulators"],
    )
    from wandacli.score_run import run_score

    with progress_reporter(enabled=not p["no_progress"]) as reporter:
        result = run_score(
            score_config, reporter=reporter, command_line=["wandacli", *sys.argv[1:]]
        )
    if result.rank == 0:  # one report for a multi-process run
        render.score_result(result, as_json=p["json_output"])


@app.command(cls=WandacliCommand)
def prune(
    scores: Annotated[
        str,
        typer.Option(
            "--scores",
            help="Score set to prune from, by name (in --store) or as a path to its .h5 file. "
            "With --utility-scores: the safety set.",
        ),
    ],
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            "-s",
            help="Store to read names from and write the mask to [default: the store holding "
            "--scores, else ./wandacli-store].",
            rich_help_panel="Store",
        ),
    ] = None,
    sparsity_ratio: Annotated[
        float | None,
        typer.Option(
            "--sparsity-ratio", "-r", help="Fraction of each row (or matrix) to prune, in [0, 1)."
        ),
    ] = None,
    sparsity_type: Annotated[
        str,
        typer.Option(
            "--sparsity-type",
            metavar="<unstructured|N:M>",
            help="unstructured, or N:M (2:4, 4:8, ...): N of every M consecutive inputs.",
        ),
    ] = "unstructured",
    prune_highest: Annotated[
        bool,
        typer.Option(
            "--prune-highest",
            "--neg-prune",
            help="Prune the highest-scored weights instead of the lowest (the reference's --neg_prune).",
        ),
    ] = False,
    variant: Annotated[
        bool,
        typer.Option(
            "--variant",
            help="The Wanda variant: per-row cumulative-score threshold (the reference's --use_variant).",
        ),
    ] = False,
    scope: Annotated[
        Literal["row", "matrix"],
        typer.Option(
            "--scope",
            help="row: each row prunes its share (the reference); matrix: rank a whole matrix at once.",
        ),
    ] = "row",
    utility_scores: Annotated[
        str | None,
        typer.Option(
            "--utility-scores",
            help="Set difference: prune the top-q safety weights (--scores) that are not in the "
            "top-p utility weights (this set), per matrix. Ignores --prune-highest, as the reference does.",
            rich_help_panel="Set difference",
        ),
    ] = None,
    p: Annotated[
        float | None,
        typer.Option(
            "--p",
            help="Top fraction of utility scores kept safe, in (0, 1].",
            rich_help_panel="Set difference",
        ),
    ] = None,
    q: Annotated[
        float | None,
        typer.Option(
            "--q",
            help="Top fraction of safety scores considered, in (0, 1].",
            rich_help_panel="Set difference",
        ),
    ] = None,
    match_counts: Annotated[
        str | None,
        typer.Option(
            "--match-counts",
            help="Prune, in every matrix, as many weights as this mask does (name or .h5), "
            "chosen by --scores: with a random score set, the control of the same size and "
            "layout as a set difference.",
        ),
    ] = None,
    remove_top_ranks: Annotated[
        int | None,
        typer.Option(
            "--remove-top-ranks",
            help="Rank edit from actsvd statistics: W ← (I − Π_R) W, the top R output "
            "directions removed (the reference's --top_remove --rank R).",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = None,
    keep_top_ranks: Annotated[
        int | None,
        typer.Option(
            "--keep-top-ranks",
            help="Rank edit: W ← Π_K W, only the top K output directions kept.",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = None,
    safety_ranks: Annotated[
        int | None,
        typer.Option(
            "--safety-ranks",
            help="Orthogonal projection (with --utility-scores): r_s, the safety directions "
            "(--scores) removed where they leave the top r_u utility directions.",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = None,
    utility_ranks: Annotated[
        int | None,
        typer.Option(
            "--utility-ranks",
            help="Orthogonal projection: r_u, the utility directions kept.",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="Rank edits in the reference's order: layer by layer, each layer's inputs "
            "recorded after the layers before it were edited (runs the model again on the "
            "sets' recorded data; about L/2 passes over it for L layers).",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = False,
    rank_neg: Annotated[
        int | None,
        typer.Option(
            "--rank-neg",
            help="The reference's parametrisation: r_s = min(d_out, d_in) − rank_neg per module.",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = None,
    rank_pos: Annotated[
        int | None,
        typer.Option(
            "--rank-pos",
            help="The reference's parametrisation: r_u = min(d_out, d_in) − rank_pos per module.",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="Only these decoder layers, e.g. 0-3,10.", rich_help_panel="Filters"
        ),
    ] = None,
    modules: Annotated[
        str | None,
        typer.Option(
            "--modules",
            help="Only modules matching this glob, e.g. 'mlp.*'.",
            rich_help_panel="Filters",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Mask name [default: derived from the settings].",
            rich_help_panel="Store",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Check the scores against this model's shapes (config only); required by --save-model.",
            rich_help_panel="Model",
        ),
    ] = None,
    save_model: Annotated[
        Path | None,
        typer.Option(
            "--save-model",
            help="Save the pruned model here (safetensors, atomic).",
            rich_help_panel="Outputs",
        ),
    ] = None,
    recover_from_base: Annotated[
        str | None,
        typer.Option(
            "--recover-from-base",
            help="With --save-model: copy this base model's weights into the pruned positions instead of zeros.",
            rich_help_panel="Outputs",
        ),
    ] = None,
    export_mask: Annotated[
        Path | None,
        typer.Option(
            "--export-mask",
            help="Also write the reference's fine-tuning mask (.pt: module name → bool tensor; "
            "True = pruned with --prune-highest, True = kept otherwise).",
            rich_help_panel="Outputs",
        ),
    ] = None,
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        typer.Option(
            "--dtype",
            help="With --save-model: auto keeps the checkpoint's dtype.",
            rich_help_panel="Model",
        ),
    ] = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    cache_dir: CacheDirOption = None,
    overwrite: OverwriteOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Build a pruning mask from stored scores (or a rank edit from actsvd rank statistics),
    keep it in the store, and optionally save the pruned model. Never computes scores: run
    `wandacli score` first."""
    model_spec_given = (
        ModelSpec(
            model=model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            cache_dir=cache_dir,
        )
        if model
        else None
    )
    rank_flags = (remove_top_ranks, keep_top_ranks, safety_ranks, utility_ranks, rank_neg, rank_pos)
    if any(value is not None for value in rank_flags) or sequential:
        from wandacli.edit_run import run_edit

        refuse_mask_flags_for_edits(
            sparsity_ratio=sparsity_ratio,
            sparsity_type=sparsity_type,
            prune_highest=prune_highest,
            variant=variant,
            scope=scope,
            p=p,
            q=q,
            match_counts=match_counts,
            recover_from_base=recover_from_base,
            export_mask=export_mask,
        )
        edit_config = EditConfig(
            scores=scores,
            model=model_spec_given,
            store=store,
            remove_top_ranks=remove_top_ranks,
            keep_top_ranks=keep_top_ranks,
            utility_scores=utility_scores,
            safety_ranks=safety_ranks,
            utility_ranks=utility_ranks,
            rank_pos=rank_pos,
            rank_neg=rank_neg,
            layers=layers,
            modules=modules,
            name=name,
            save_model=save_model,
            overwrite=overwrite,
            sequential=sequential,
        )
        with progress_reporter(enabled=not no_progress) as reporter:
            edited = run_edit(
                edit_config, reporter=reporter, command_line=["wandacli", *sys.argv[1:]]
            )
        render.edit_result(edited, as_json=json_output)
        return
    prune_config = PruneConfig(
        scores=scores,
        store=store,
        sparsity_ratio=sparsity_ratio,
        sparsity_type=sparsity_type,
        prune_highest=prune_highest,
        variant=variant,
        scope=scope,
        utility_scores=utility_scores,
        p=p,
        q=q,
        match_counts=match_counts,
        layers=layers,
        modules=modules,
        name=name,
        model=model_spec_given,
        save_model=save_model,
        recover_from_base=recover_from_base,
        export_mask=export_mask,
        overwrite=overwrite,
    )
    from wandacli.prune_run import run_prune

    with progress_reporter(enabled=not no_progress) as reporter:
        result = run_prune(
            prune_config, reporter=reporter, command_line=["wandacli", *sys.argv[1:]]
        )
    render.prune_result(result, as_json=json_output)


@app.command(cls=WandacliCommand)
def compare(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Two or more masks or score sets: paths to .h5 files (or names, with --store)."
        ),
    ],
    top: Annotated[
        float,
        typer.Option(
            "--top", help="A score set takes part as its top fraction per matrix, in (0, 1]."
        ),
    ] = 0.01,
    per_row: Annotated[
        bool, typer.Option("--per-row", help="Rank score sets row by row instead of per matrix.")
    ] = False,
    sample: Annotated[
        int,
        typer.Option(
            "--sample",
            help="Spearman on this many seeded random entries of larger matrices (exact below).",
        ),
    ] = 100_000,
    seed: SeedOption = 0,
    store: Annotated[
        Path | None,
        typer.Option("--store", "-s", help="Store to look names up in.", rich_help_panel="Store"),
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Write every figure to this CSV file.")
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json-file", help="Write every figure to this JSON file.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Draw the first pair's Jaccard heatmap (rank statistics: the φ heatmap at the "
            "first ranks) to this file (.png or .svg).",
        ),
    ] = None,
    ranks: Annotated[
        str,
        typer.Option(
            "--ranks",
            metavar="<r,r,...>",
            help="Rank statistics (actsvd): the subspace similarity φ(r, r) at these ranks.",
            rich_help_panel="Rank statistics",
        ),
    ] = "10",
    rank_grid: Annotated[
        bool,
        typer.Option(
            "--rank-grid",
            help="Rank statistics: φ(r_a, r_b) for every pair of --ranks, not only r_a = r_b.",
            rich_help_panel="Rank statistics",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Rank statistics: the model they were computed on (its weights give the "
            "output directions).",
            rich_help_panel="Rank statistics",
        ),
    ] = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """How much do masks and score sets agree on which weights matter: sizes, intersections,
    Jaccard index per layer and module, and Spearman's rank correlation between score sets."""
    from wandacli.compare import compare_files, plot_format, write_csv, write_json
    from wandacli.subspaces import are_rank_statistics

    if plot is not None:
        plot_format(plot)  # a bad file name fails before the comparison is computed
    if are_rank_statistics(inputs, store):
        from wandacli.subspaces import compare_rank_statistics

        with progress_reporter(enabled=not no_progress) as reporter:
            subspaces = compare_rank_statistics(
                inputs,
                store_root=store,
                model=ModelSpec(model=model, dtype=dtype, device=device) if model else None,
                ranks=ranks,
                grid=rank_grid,
                csv_file=csv_file,
                json_file=json_file,
                plot=plot,
                reporter=reporter,
            )
        render.subspace_comparison(subspaces, as_json=json_output)
        return
    with progress_reporter(enabled=not no_progress) as reporter:
        result = compare_files(
            inputs,
            store_root=store,
            top=top,
            per_row=per_row,
            sample=sample,
            seed=seed,
            reporter=reporter,
        )
    if csv_file is not None:
        write_csv(result, csv_file)
    if json_file is not None:
        write_json(result, json_file)
    if plot is not None:
        from wandacli.compare import heatmap_figure

        heatmap_figure(result, plot)
    render.comparison(result, as_json=json_output)


@app.command("eval-attack", cls=WandacliCommand)
def eval_attack(
    model: ModelOption = DEFAULT_MODEL_ALIAS,
    mask: MaskOption = None,
    store: MaskStoreOption = None,
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            metavar="<NAME|FILE>",
            help="Harmful prompts: a named set or a file. Named: " + describe_named_sets("prompts"),
            rich_help_panel="Prompts",
        ),
    ] = "advbench",
    prompt_column: Annotated[
        str | None,
        typer.Option(
            "--prompt-column", help="Prompt column of a table file.", rich_help_panel="Prompts"
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", help="First N prompts (the reference uses 100).", rich_help_panel="Prompts"
        ),
    ] = 100,
    configs: Annotated[
        str,
        typer.Option(
            "--configs",
            metavar="<basic,basic_nosys,multiple_nosys,gcg>",
            help="Comma list of basic, basic_nosys, multiple_nosys, gcg [default: all].",
            rich_help_panel="Prompts",
        ),
    ] = "basic,basic_nosys,multiple_nosys,gcg",
    inst: Annotated[
        bool | None,
        typer.Option(
            "--inst/--no-inst",
            help="Only with (or without) instruction tags [default: both; GCG always with tags].",
            rich_help_panel="Prompts",
        ),
    ] = None,
    template: Annotated[
        Literal["chat", "llama2"] | None,
        typer.Option(
            "--template",
            help="llama2: the reference's [INST] <<SYS>> strings exactly; chat: the tokenizer's "
            "chat template [default: chat when the tokenizer has one].",
            rich_help_panel="Prompts",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", help="Tokens generated per response.", rich_help_panel="Generation"
        ),
    ] = 256,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Prompts per batch (hf backend).", rich_help_panel="Generation"
        ),
    ] = 16,
    samples: Annotated[
        int,
        typer.Option(
            "--samples", help="Samples per prompt in multiple_nosys.", rich_help_panel="Generation"
        ),
    ] = 5,
    backend: Annotated[
        Literal["hf", "vllm"],
        typer.Option(
            "--backend",
            help="hf: transformers; vllm: vLLM if installed.",
            rich_help_panel="Generation",
        ),
    ] = "hf",
    judge: Annotated[
        str,
        typer.Option(
            "--judge",
            metavar="<keyword|hf:MODEL>",
            help="keyword: the reference's refusal phrases; hf:MODEL: a HarmBench-style classifier LLM.",
        ),
    ] = "keyword",
    seed: SeedOption = 0,
    out_dir: OutOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    cache_dir: CacheDirOption = None,
    data_dir: DataDirOption = None,
    overwrite: OverwriteOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """How often does the model answer harmful prompts? Attack success rate in the reference's
    configurations, with every response kept as JSONL."""
    from wandacli.attack import run_attack

    attack_config = AttackConfig(
        model=ModelSpec(
            model=model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            cache_dir=cache_dir,
        ),
        mask=mask,
        store=store,
        prompts=prompts,
        prompt_column=prompt_column,
        limit=limit,
        configs=tuple(c.strip() for c in configs.split(",") if c.strip()),
        inst=(True, False) if inst is None else (inst,),
        template=template,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        backend=backend,
        judge=judge,
        samples=samples,
        seed=seed,
        out=out_dir,
        overwrite=overwrite,
        data_dir=data_dir,
    )
    with progress_reporter(enabled=not no_progress) as reporter:
        result = run_attack(attack_config, reporter=reporter)
    render.attack_result(result, as_json=json_output)


@app.command("eval-utility", cls=WandacliCommand)
def eval_utility(
    model: ModelOption = DEFAULT_MODEL_ALIAS,
    mask: MaskOption = None,
    store: MaskStoreOption = None,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            metavar="<NAME|FILE>",
            help="Perplexity text: wikitext (WikiText-2 test) or a text file; 'none' to skip.",
        ),
    ] = "wikitext",
    seqlen: Annotated[
        int | None,
        typer.Option(
            "--seqlen",
            help="Window length [default: min(4096, model context), the reference's Llama-2 window].",
        ),
    ] = None,
    limit_windows: Annotated[
        int | None, typer.Option("--limit-windows", help="Only the first K windows (quick checks).")
    ] = None,
    zero_shot: Annotated[
        str | None,
        typer.Option(
            "--zero-shot",
            help="Comma list of lm-evaluation-harness tasks, or 'reference' for the reference's six "
            "(boolq, rte, hellaswag, winogrande, arc_challenge, openbookqa). Needs wandacli[eval].",
        ),
    ] = None,
    zero_shot_limit: Annotated[
        int, typer.Option("--zero-shot-limit", help="Examples per task (the reference's 200).")
    ] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Zero-shot batch size.")] = 1,
    out_dir: OutOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    cache_dir: CacheDirOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """How much general ability is left? Perplexity (the reference's WikiText-2 computation)
    and zero-shot accuracy through lm-evaluation-harness."""
    from wandacli.evaluate import run_utility
    from wandacli.reference import ZERO_SHOT_TASKS

    tasks: tuple[str, ...] = ()
    if zero_shot:
        tasks = (
            ZERO_SHOT_TASKS
            if zero_shot == "reference"
            else tuple(t.strip() for t in zero_shot.split(",") if t.strip())
        )
    utility_config = UtilityConfig(
        model=ModelSpec(
            model=model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            cache_dir=cache_dir,
        ),
        mask=mask,
        store=store,
        data=None if data == "none" else data,
        seqlen=seqlen,
        limit_windows=limit_windows,
        zero_shot=tasks,
        zero_shot_limit=zero_shot_limit,
        batch_size=batch_size,
        out=out_dir,
        data_dir=data_dir,
    )
    with progress_reporter(enabled=not no_progress) as reporter:
        result = run_utility(utility_config, reporter=reporter)
    render.utility_result(result, as_json=json_output)


@app.command(cls=WandacliCommand)
def report(
    results: Annotated[
        Path, typer.Argument(help="Results directory: one subdirectory per model under test.")
    ] = Path("wandacli-results"),
    markdown_file: Annotated[
        Path | None,
        typer.Option(
            "--markdown",
            help="Also write the table, and the figures of --plots embedded, as a Markdown document.",
        ),
    ] = None,
    plots: Annotated[
        Path | None,
        typer.Option(
            "--plots",
            help="Draw the study's figures into this folder, as PNG and SVG: ASR against "
            "perplexity, ASR and perplexity against sparsity, and the Jaccard heatmaps of --compare.",
        ),
    ] = None,
    compare_dir: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="Folder of `wandacli compare --csv` files: one Jaccard heatmap per pair (with --plots).",
        ),
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """One table of every model under test: sparsity, attack success rates, perplexity; with
    --plots, the study's figures."""
    from wandacli.report import build_report

    if compare_dir is not None and plots is None:
        raise ConfigError("--compare draws heatmaps: give --plots DIR too")
    result = build_report(
        results, markdown_file=markdown_file, plots_dir=plots, compare_dir=compare_dir
    )
    render.report(result, as_json=json_output)


@app.command("import-legacy", cls=WandacliCommand)
def import_legacy_command(
    directory: Annotated[
        Path,
        typer.Argument(
            help="The reference's --save folder (or its wanda_score/) holding W_metric_*.pkl dumps."
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="The model the dumps were computed on (shapes are checked)."
        ),
    ],
    store: StoreOption = DEFAULT_STORE,
    name: Annotated[str, typer.Option("--name", help="Score set name to write.")] = "imported",
    suffix: Annotated[
        str | None,
        typer.Option(
            "--suffix",
            help="Which dumps when several exist, e.g. weight or align_weight_only_disentangle.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="Record this method [default: inferred from the file names]."
        ),
    ] = None,
    negate: Annotated[
        bool,
        typer.Option(
            "--negate", help="Flip the sign (dumps made with --neg_prune hold negated scores)."
        ),
    ] = False,
    cache_dir: CacheDirOption = None,
    overwrite: OverwriteOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Import the reference code's pickled score dumps into a score set, keeping scores you
    already paid for. Never runs code from a pickle: only tensors are rebuilt."""
    from wandacli.legacy import import_legacy

    with progress_reporter(enabled=not no_progress) as reporter:
        result = import_legacy(
            directory,
            model=ModelSpec(model=model, cache_dir=cache_dir),
            store=store,
            name=name,
            suffix=suffix,
            method=method,
            negate=negate,
            overwrite=overwrite,
            reporter=reporter,
            command_line=["wandacli", *sys.argv[1:]],
        )
    if json_output:
        render.print_json(result.to_json())
    else:
        render.out.print(
            render.key_value_table(
                "score set imported",
                [
                    ("score set", result.name),
                    ("method", result.method),
                    ("files", str(result.files)),
                    ("file", str(result.path)),
                ],
            )
        )


@app.command("check-config", cls=WandacliCommand)
def check_config(
    path: Annotated[Path, typer.Argument(help="A wandacli TOML config file.")],
) -> None:
    """Validate a config file: every key an option of its command, every value of the
    option's type, and a [pipeline] table the Makefile's pipeline can run."""
    from wandacli.pipeline import Plan

    config_data = read_config_file(path)
    group = typer.main.get_command(app)
    assert isinstance(group, WandacliGroup)
    sections = default_map(config_data, group.options_by_command())
    checked = 0
    for name, section in sections.items():
        command = group.commands[name]
        ctx = typer.Context(command, info_name=name)
        params = {p.name: p for p in command.params if p.name}
        for key, value in section.items():
            try:
                params[key].process_value(ctx, value)
            except typer.TyperException as exc:
                message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
                raise ConfigError(
                    f"{path}: [{name}] {key} = {value!r}: {' '.join(message.split())}"
                ) from None
            checked += 1
    if "pipeline" in config_data:
        Plan.from_config(config_data, path)
    console.print(
        f"{path}: {checked} settings for {len(sections)} commands are valid",
        markup=False,
        soft_wrap=True,
    )


@app.command(cls=WandacliCommand)
def inspect(
    store: Annotated[Path, typer.Argument(help="Store directory.")] = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """List the score sets and rank statistics (finished or not), masks and rank edits in a
    store, with their metadata."""
    sets, masks, edits = summarize_store(store)
    render.store_listing(sets, masks, edits, as_json=json_output)


def _quiet_unraisable(unraisable: Any) -> None:
    """After a failed write, h5py retries closing the file when the object is freed and prints
    the same I/O error again as an "exception ignored" traceback; the user already has the
    one-line error. Shown with --debug."""
    if _debug_enabled():
        sys.__unraisablehook__(unraisable)


def main() -> None:
    """Console-script entry point."""
    sys.unraisablehook = _quiet_unraisable
    try:
        app()
    except SystemExit as exc:
        if exc.code in (EXIT_SIGINT, EXIT_SIGTERM):
            # A KeyboardInterrupt that crossed C code while importing (torch, transformers)
            # leaves CPython resolved to re-kill itself with SIGINT at exit, whatever we
            # return; the interruption is handled and reported, so exit with our code now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(exc.code))
        raise
