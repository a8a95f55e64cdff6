"""`wandacli search`: the operating point of a removal, found from the stored sets."""

from __future__ import annotations

import sys
from pathlib import Path
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
    KlLimitOption,
    KlPositionsOption,
    KlPromptsOption,
    MaxMemoryOption,
    ModelOption,
    NoProgressOption,
    SeedOption,
    model_spec,
)
from wandacli.config.evaluation import KL_LIMIT, KL_POSITIONS, KL_PROMPTS
from wandacli.config.search import DEFAULT_HELD_OUT, BestRule, ParameterRange, SearchConfig
from wandacli.config.settings import DEFAULT_MODEL_ALIAS
from wandacli.core.console import progress_reporter
from wandacli.reporting import render

_SPACE = "Search space (one kind)"
_MEASURE = "Objectives"


def _range(flag: str, help_text: str, metavar: str = "LO:HI") -> object:
    return typer.Option(flag, metavar=metavar, help=help_text, rich_help_panel=_SPACE)


def search(
    ctx: typer.Context,
    name: Annotated[
        str,
        typer.Option("--name", help="The search's name: STORE/searches/<name>; rerun to resume."),
    ],
    scores: Annotated[
        str,
        typer.Option(
            "--scores",
            help="Safety score set (set difference, --ratio) or safety rank statistics (projection).",
        ),
    ],
    model: ModelOption = DEFAULT_MODEL_ALIAS,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            "-s",
            help="Store of the sets; the search and kept points are written there [default: the store holding --scores, else ./wandacli-store].",
            rich_help_panel="Store",
        ),
    ] = None,
    utility_scores: Annotated[
        str | None,
        typer.Option("--utility-scores", help="Utility score set or rank statistics."),
    ] = None,
    p: Annotated[
        str | None,
        _range("--p", "Set difference: the top-p utility fractions to spare, e.g. 0.02:0.2."),
    ] = None,
    q: Annotated[
        str | None,
        _range("--q", "Set difference: the top-q safety fractions to prune, e.g. 0.02:0.2."),
    ] = None,
    ratio: Annotated[
        str | None,
        _range(
            "--ratio", "Top of --scores alone: each row's top fraction pruned, e.g. 0.001:0.05."
        ),
    ] = None,
    safety_ranks: Annotated[
        str | None, _range("--safety-ranks", "Orthogonal projection: r_s, the safety ranks.")
    ] = None,
    utility_ranks: Annotated[
        str | None, _range("--utility-ranks", "Orthogonal projection: r_u, the utility ranks.")
    ] = None,
    rank_neg: Annotated[
        str | None,
        _range("--rank-neg", "The reference's rank_neg per module: r_s = full rank − rank_neg."),
    ] = None,
    rank_pos: Annotated[
        str | None,
        _range("--rank-pos", "The reference's rank_pos per module: r_u = full rank − rank_pos."),
    ] = None,
    direction_layer: Annotated[
        str | None,
        _range(
            "--direction-layer",
            "The refusal direction (two mean-activations sets): its residual stream, e.g. 8:24.",
        ),
    ] = None,
    direction_position: Annotated[
        str | None,
        _range(
            "--direction-position",
            "The refusal direction's prompt position from the end, e.g. -5:-1 [default: -1].",
        ),
    ] = None,
    direction_scale: Annotated[
        str | None,
        _range(
            "--direction-scale",
            "The share of the refusal direction removed, e.g. 0.3:1 [default: 1, all of it].",
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="Only these decoder layers, e.g. 0-3,10.", rich_help_panel=_SPACE
        ),
    ] = None,
    modules: Annotated[
        str | None,
        typer.Option(
            "--modules",
            help="Only modules matching this glob, e.g. '*proj'.",
            rich_help_panel=_SPACE,
        ),
    ] = None,
    trials: Annotated[
        int,
        typer.Option("--trials", help="Complete trials to reach (a rerun with more continues)."),
    ] = 40,
    startup_trials: Annotated[
        int, typer.Option("--startup-trials", help="Random trials before TPE models the front.")
    ] = 10,
    keep: Annotated[
        int,
        typer.Option(
            "--keep",
            help="Write N front points into the store as masks or edits named <name>.t<trial>.",
        ),
    ] = 0,
    keep_best: Annotated[
        str | None,
        typer.Option(
            "--keep-best",
            metavar="OBJECTIVE:LIMIT",
            help="Also write, as <name>.best, the front point lowest in the other objective among "
            "those with OBJECTIVE ≤ LIMIT: refusal:0.5 (the cheapest that halves refusals) or "
            "kl:0.1 (the fewest refusals within a KL budget).",
        ),
    ] = None,
    seed: SeedOption = 0,
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            metavar="<NAME|FILE>",
            help="Harmful search prompts: a prompt set, a pair set's prompts, or a file.",
            rich_help_panel=_MEASURE,
        ),
    ] = "advbench",
    prompt_column: Annotated[
        str | None,
        typer.Option(
            "--prompt-column", help="Prompt column of a table file.", rich_help_panel=_MEASURE
        ),
    ] = None,
    offset: Annotated[
        int,
        typer.Option(
            "--offset",
            help="Skip the first N prompts (AdvBench's first 100 are the evaluation set).",
            rich_help_panel=_MEASURE,
        ),
    ] = 100,
    limit: Annotated[
        int, typer.Option("--limit", help="Search prompts used.", rich_help_panel=_MEASURE)
    ] = 32,
    held_out: Annotated[
        str,
        typer.Option(
            "--held-out",
            metavar="<NAME[:N],...>",
            help="Evaluation prompts the search prompts must not contain ('none' to skip the check).",
            rich_help_panel=_MEASURE,
        ),
    ] = DEFAULT_HELD_OUT,
    refusal: Annotated[
        Literal["generation", "score"],
        typer.Option(
            "--refusal",
            help="generation: share of short greedy responses with a refusal phrase; score: log-odds of a refusal token, no generation.",
            rich_help_panel=_MEASURE,
        ),
    ] = "generation",
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens",
            help="Tokens per search response (--refusal generation).",
            rich_help_panel=_MEASURE,
        ),
    ] = 24,
    kl_prompts: KlPromptsOption = KL_PROMPTS,
    kl_limit: KlLimitOption = KL_LIMIT,
    kl_positions: KlPositionsOption = KL_POSITIONS,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="Sequences per forward pass or generation batch.",
            rich_help_panel=_MEASURE,
        ),
    ] = 32,
    template: Annotated[
        Literal["chat", "llama2"] | None,
        typer.Option(
            "--template",
            help="Prompt template [default: chat when the tokenizer has one].",
            rich_help_panel=_MEASURE,
        ),
    ] = None,
    select: Annotated[
        Literal["tpe", "reference"],
        typer.Option(
            "--select",
            help="tpe: Optuna's two-objective search; reference: the refusal-direction "
            "reference's selection over every (layer, position) in the ranges (filters: the last "
            "20% of layers, KL > 0.1, an induced refusal score < 0; then the lowest bypass "
            "score), kept as <name>.best.",
            rich_help_panel=_SPACE,
        ),
    ] = "tpe",
    control: Annotated[
        bool,
        typer.Option(
            "--control/--no-control",
            help="Measure a random removal of the size of the front's lowest-refusal point.",
        ),
    ] = True,
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
    """Search a removal's parameters from the stored sets: refusal against KL, the Pareto
    front kept as masks or edits.

    Optuna's multi-objective TPE over the set difference's p and q, a top ratio, or the
    orthogonal projection's ranks: every trial builds the removal in memory from the store,
    measures how much the model still refuses on the search prompts and the KL divergence from
    the dense model on harmless prompts, and restores the weights. Rerun to resume."""
    from wandacli.search.run import run_search

    def parsed(flag: str, text: str | None, integer: bool = False) -> ParameterRange | None:
        return ParameterRange.parse(text, flag, integer=integer) if text is not None else None

    search_config = SearchConfig(
        name=name,
        scores=scores,
        model=model_spec(ctx.params),
        store=store,
        utility_scores=utility_scores,
        p=parsed("--p", p),
        q=parsed("--q", q),
        ratio=parsed("--ratio", ratio),
        safety_ranks=parsed("--safety-ranks", safety_ranks, True),
        utility_ranks=parsed("--utility-ranks", utility_ranks, True),
        rank_neg=parsed("--rank-neg", rank_neg, True),
        rank_pos=parsed("--rank-pos", rank_pos, True),
        direction_layer=parsed("--direction-layer", direction_layer, True),
        direction_position=parsed("--direction-position", direction_position, True),
        direction_scale=parsed("--direction-scale", direction_scale),
        layers=layers,
        modules=modules,
        trials=trials,
        startup_trials=startup_trials,
        keep=keep,
        keep_best=BestRule.parse(keep_best) if keep_best is not None else None,
        seed=seed,
        prompts=prompts,
        prompt_column=prompt_column,
        offset=offset,
        limit=limit,
        held_out=held_out,
        refusal=refusal,
        max_new_tokens=max_new_tokens,
        kl_prompts=kl_prompts,
        kl_limit=kl_limit,
        kl_positions=kl_positions,
        batch_size=batch_size,
        template=template,
        control=control,
        data_dir=data_dir,
        select=select,
    )
    with progress_reporter(enabled=not no_progress) as reporter:
        result = run_search(search_config, reporter=reporter, command_line=sys.argv)
    render.search_result(result, as_json=json_output)
