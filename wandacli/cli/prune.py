"""`wandacli prune`: masks from score sets, rank edits from rank statistics."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from wandacli.cli.options import (
    CacheDirOption,
    ConfigOption,
    DeviceMapOption,
    DeviceOption,
    JsonOption,
    MaxMemoryOption,
    NoProgressOption,
    OverwriteOption,
    model_spec,
)
from wandacli.config.removal import (
    EditConfig,
    PruneConfig,
    check_direction_scale,
    refuse_mask_flags_for_edits,
)
from wandacli.core.console import progress_reporter
from wandacli.core.errors import ConfigError
from wandacli.reporting import render


def prune(
    ctx: typer.Context,
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
    direction_layer: Annotated[
        int | None,
        typer.Option(
            "--direction-layer",
            help="The refusal direction from two mean-activations sets (--scores HARMFUL "
            "--utility-scores HARMLESS): r = normalise(μ_harmful − μ_harmless) at this residual "
            "stream (hidden_states[L]), removed from every module writing into the stream "
            "(W ← W − r rᵀ W) and from the token embedding (E ← E − E r rᵀ).",
            rich_help_panel="Refusal direction",
        ),
    ] = None,
    direction_position: Annotated[
        int,
        typer.Option(
            "--direction-position",
            help="The direction's prompt position, from the end (-1: the last prompt token).",
            rich_help_panel="Refusal direction",
        ),
    ] = -1,
    direction_scale: Annotated[
        float,
        typer.Option(
            "--direction-scale",
            help="The share α of the direction removed, in (0, 1]: W ← W − α r rᵀ W and "
            "E ← E − α E r rᵀ (heretic's abliteration weight; 1: all of it).",
            rich_help_panel="Refusal direction",
        ),
    ] = 1.0,
    match_ranks: Annotated[
        str | None,
        typer.Option(
            "--match-ranks",
            help="Rank edit control: remove, in every module, as much rank as this edit does "
            "(name or .h5), in random orthonormal directions (--seed); --scores (rank "
            "statistics) only names the model.",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="--match-ranks: the random directions' seed.",
            rich_help_panel="Rank edits (actsvd)",
        ),
    ] = 0,
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
    model_spec_given = model_spec(ctx.params) if model else None
    rank_flags = (
        remove_top_ranks,
        keep_top_ranks,
        safety_ranks,
        utility_ranks,
        rank_neg,
        rank_pos,
        match_ranks,
        direction_layer,
    )
    check_direction_scale(direction_scale, direction_layer)  # a mask would drop it silently
    if seed != 0 and match_ranks is None:
        raise ConfigError(
            "--seed draws --match-ranks's random directions (a random mask's seed is its score "
            "set's: `score --method random --seed`): add --match-ranks EDIT or drop --seed"
        )
    if any(value is not None for value in rank_flags) or sequential:
        from wandacli.removal.edits import run_edit

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
            match_ranks=match_ranks,
            seed=seed,
            direction_layer=direction_layer,
            direction_position=direction_position,
            direction_scale=direction_scale,
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
    from wandacli.removal.prune import run_prune

    with progress_reporter(enabled=not no_progress) as reporter:
        result = run_prune(
            prune_config, reporter=reporter, command_line=["wandacli", *sys.argv[1:]]
        )
    render.prune_result(result, as_json=json_output)
