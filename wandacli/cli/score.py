"""`wandacli score`: attribution scores or rank statistics into the store."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer

from wandacli.cli.options import (
    CacheDirOption,
    ConfigOption,
    DataDirOption,
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    MaxMemoryOption,
    ModelOption,
    NoProgressOption,
    OverwriteOption,
    SeedOption,
    StoreOption,
    model_spec,
)
from wandacli.config.score import ScoreConfig
from wandacli.config.settings import (
    DEFAULT_MODEL_ALIAS,
    DEFAULT_STORE,
    MEAN_POSITIONS,
    METHODS,
    Columns,
)
from wandacli.core.console import progress_reporter
from wandacli.core.errors import ConfigError
from wandacli.data.sources import describe_named_sets
from wandacli.reporting import render


def score(
    ctx: typer.Context,
    method: Annotated[
        Literal["wanda", "wandg", "magnitude", "random", "actsvd", "mean-activations"] | None,
        typer.Option(
            "--method",
            help="wanda: |W|·‖X‖₂ over calibration inputs; wandg (SNIP): |W|·Σ|∇W| of the "
            "calibration loss; magnitude: |W|; random: seeded uniform; actsvd: rank statistics "
            "(each input's second moment Σxxᵀ/N) for rank edits, not per-weight scores; "
            "mean-activations: the mean residual stream at the last --positions prompt tokens, "
            "per layer, for a refusal direction (prompts only: a pair set's responses are not "
            "read; each prompt as eval-attack shows it in --template, without a system prompt).",
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
    positions: Annotated[
        int,
        typer.Option(
            "--positions",
            help="mean-activations: the last K prompt positions averaged (the post-instruction "
            "tokens: the chat template's assistant cue, Llama-2's [/INST]).",
            rich_help_panel="Data",
        ),
    ] = MEAN_POSITIONS,
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
        raise ConfigError(f"--method is required: {', '.join(METHODS)}")
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
        positions=p["positions"],
    )
    from wandacli.scoring.run import run_score

    with progress_reporter(enabled=not p["no_progress"]) as reporter:
        result = run_score(
            score_config, reporter=reporter, command_line=["wandacli", *sys.argv[1:]]
        )
    if result.rank == 0:  # one report for a multi-process run
        render.score_result(result, as_json=p["json_output"])
