"""Results on stdout: Rich tables for people, JSON for machines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from wandacli.analysis.compare import Comparison, PairFigures
from wandacli.core.console import console, out
from wandacli.core.metrics import COLUMN_LEGENDS, REPORT_COLUMNS
from wandacli.reporting.heatmap import compact_count, heatmap_legend, jaccard_heatmap
from wandacli.reporting.labels import short_module_name
from wandacli.reporting.render_store import human_bytes, key_value_table, print_json, sparsity_table

if TYPE_CHECKING:
    from wandacli.analysis.subspaces import SubspaceComparison
    from wandacli.evaluation.attack import AttackResult
    from wandacli.evaluation.utility import UtilityResult
    from wandacli.removal.results import EditResult, PruneResult
    from wandacli.reporting.report import Report
    from wandacli.scoring.result import ScoreResult
    from wandacli.search.run import SearchResult


def score_result(result: ScoreResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    if result.already_complete:
        out.print(
            f"score set {result.name!r} is already complete, nothing to do ({result.path}; "
            "--overwrite recomputes it)",
            markup=False,
        )
        return
    memory = human_bytes(result.peak_memory_bytes)
    if result.peak_gpu_memory_bytes:
        memory += f" (GPU {human_bytes(result.peak_gpu_memory_bytes)})"
    rows = [
        ("score set", result.name + (" (resumed)" if result.resumed else "")),
        ("method", result.method),
        ("samples", str(result.nsamples) if result.nsamples else "-"),
        ("modules", f"{result.modules} in {result.layers} layers"),
        _what_the_set_holds(result),
        ("time", f"{result.seconds:.1f} s"),
        ("peak memory", memory),
        ("file", str(result.path)),
    ]
    out.print(key_value_table("score set written", rows))


def _what_the_set_holds(result: ScoreResult) -> tuple[str, str]:
    """One row of the set's size, in what it holds: scores per weight, second moments per
    input, or mean activations per residual stream and position."""
    meta = result.meta or {}
    if meta.get("positions") and meta.get("hidden_size"):
        streams = result.layers + 1
        return (
            "means",
            f"{streams} residual streams × {meta['positions']} positions × {meta['hidden_size']}",
        )
    if meta.get("counted_tokens") is not None and result.method == "actsvd":
        return ("second moments", f"one per distinct input, over {meta['counted_tokens']:,} tokens")
    return ("weights scored", f"{result.parameters:,}")


def prune_result(result: PruneResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    if result.already_complete:
        out.print(
            f"mask {result.name!r} is already complete, nothing to do ({result.path}; "
            f"{100 * result.sparsity:.4f}% pruned; --overwrite recomputes it)",
            markup=False,
        )
        return
    out.print(
        sparsity_table(f"mask {result.name}: sparsity (%) by layer and module", result.counts)
    )
    rows = [
        ("mask", result.name),
        ("mode", result.mode),
        ("pruned", f"{result.pruned:,} of {result.total:,} weights ({100 * result.sparsity:.4f}%)"),
    ]
    if result.model_zero_fraction is not None:
        rows.append(
            (
                "model sparsity",
                f"{100 * result.model_zero_fraction:.4f}% exact zeros in decoder linear weights",
            )
        )
    if result.saved_model is not None:
        rows.append(("saved model", str(result.saved_model)))
    if result.exported_mask is not None:
        rows.append(("exported mask", str(result.exported_mask)))
    rows += [
        ("time", f"{result.seconds:.1f} s"),
        ("peak memory", human_bytes(result.peak_memory_bytes)),
        ("file", str(result.path)),
    ]
    out.print(key_value_table("mask written", rows))


def subspace_comparison(result: SubspaceComparison, as_json: bool) -> None:
    """Mean φ per module type for every rank pair, then the per-layer heatmap of the first."""
    import math

    if as_json:
        print_json(result.to_json())
        return
    table = Table(
        title=f"subspace similarity φ: {result.a} (A) vs {result.b} (B), mean over layers",
        title_justify="left",
    )
    table.add_column("module")
    for rank_a, rank_b in result.ranks:
        table.add_column(
            f"r={rank_a}" if rank_a == rank_b else f"{rank_a}×{rank_b}", justify="right"
        )
    means = [result.by_module_type(ranks) for ranks in result.ranks]
    modules = list(dict.fromkeys(key.split("/", 1)[1] for key in result.values))
    for module in modules:
        row = [m.get(module, math.nan) for m in means]
        table.add_row(
            short_module_name(module), *("-" if math.isnan(v) else f"{v:.3f}" for v in row)
        )
    table.caption = "φ = ‖V_Aᵀ V_B‖²_F / min(r_A, r_B): 1 = one subspace holds the other; '-': rank beyond the module"
    out.print(table)
    first = result.ranks[0]
    values = {f"{layer}/{module}": v for (layer, module), v in result.grid(first).items()}
    out.print(jaccard_heatmap(f"φ by layer and module at ranks {first[0]}, {first[1]}", values))
    out.print(heatmap_legend("φ"))


def comparison(result: Comparison, as_json: bool) -> None:
    import math

    if as_json:
        print_json(result.to_json())
        return
    kinds = ", ".join(
        f"{i.label} ({'mask' if i.kind == 'mask' else f'top {result.top:g} of scores' + (' per row' if result.per_row else '')})"
        for i in result.inputs
    )
    out.print(Text(f"comparing {kinds}", overflow="fold"))
    for pair in result.pairs[:1] if len(result.inputs) > 2 else result.pairs:
        out.print(_pair_summary(result, pair))
        values = {m.key: m.overlap.jaccard for m in pair.modules}
        out.print(jaccard_heatmap(f"Jaccard by layer and module: {pair.a} vs {pair.b}", values))
        out.print(heatmap_legend())
    if len(result.inputs) > 2:
        out.print(Text("(per-layer detail shown for the first pair; --csv/--json hold every pair)"))
        labels = [i.label for i in result.inputs]
        matrix = Table(title="overall Jaccard, every pair", title_justify="left")
        matrix.add_column("")
        for label in labels:
            matrix.add_column(label, justify="right", overflow="fold")
        for label, row in zip(labels, result.jaccard_matrix(), strict=True):
            matrix.add_row(label, *("-" if math.isnan(v) else f"{v:.3f}" for v in row))
        out.print(matrix)


def _pair_summary(result: Comparison, pair: PairFigures) -> Table:
    import math

    from wandacli.analysis.compare import Overlap

    has_rank = any(m.spearman is not None for m in pair.modules)
    table = Table(title=f"{pair.a} (A) vs {pair.b} (B), by module type", title_justify="left")
    for column in ("module", "|A|", "|B|", "|A∩B|", "|A\\B|", "|B\\A|", "Jaccard"):
        table.add_column(column, justify="right" if column != "module" else "left")
    if has_rank:
        table.add_column("Spearman", justify="right")
    by_module: dict[str, list[Any]] = {}
    for module_figures in pair.modules:
        by_module.setdefault(module_figures.key.split("/", 1)[1], []).append(module_figures)

    def cells(overlap: Overlap, rho: float | None) -> list[str]:
        jaccard = "-" if math.isnan(overlap.jaccard) else f"{overlap.jaccard:.3f}"
        row = [
            compact_count(overlap.size_a),
            compact_count(overlap.size_b),
            compact_count(overlap.intersection),
            compact_count(overlap.a_minus_b),
            compact_count(overlap.b_minus_a),
            jaccard,
        ]
        if has_rank:
            row.append("-" if rho is None or math.isnan(rho) else f"{rho:.3f}")
        return row

    for module, group in by_module.items():
        subset = PairFigures(pair.a, pair.b, group)
        table.add_row(
            short_module_name(module), *cells(subset.overall, subset.overall_spearman(result.sizes))
        )
    table.add_section()
    table.add_row("all", *cells(pair.overall, pair.overall_spearman(result.sizes)), style="bold")
    if has_rank:
        methods = sorted({m.spearman_method for m in pair.modules if m.spearman_method})
        table.caption = f"Spearman: {', '.join(methods)} per matrix; rows are size-weighted means"
    return table


# ---------------------------------------------------------------------------------------------
# eval-attack and eval-utility


def _under_test_rows(under_test: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("model", str(under_test.get("model")))]
    if under_test.get("mask"):
        rows.append(("mask", str(under_test["mask"])))
    rows.append(("method", str(under_test.get("method"))))
    rows.append(
        ("actual sparsity", f"{100 * float(under_test.get('actual_sparsity') or 0):.4f}% zeros")
    )
    if under_test.get("p_q"):
        p, q = under_test["p_q"]
        rows.append(("p, q", f"{p:g}, {q:g}"))
    return rows


def attack_result(result: AttackResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    table = Table(title="attack success rate (ASR)", title_justify="left")
    for column, justify in (
        ("configuration", "left"),
        ("tags", "left"),
        ("ASR", "right"),
        ("also", "left"),
        ("responses", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    # With tags, a prompt is wrapped in the reference's [INST] or in the tokenizer's own chat
    # template (data/templates.build_prompt); without, it is the plain string in both.
    tagged = "[INST]" if result.under_test.get("template") == "llama2" else "chat template"
    for summary in result.summaries:
        also = ""
        if summary.sample_mean is not None:
            also = f"any of {summary.responses // max(1, summary.prompts)}; per-sample mean {summary.sample_mean:.4f} (reference)"
        elif summary.per_suffix:
            also = "max over suffixes " + ", ".join(f"{v:.2f}" for v in summary.per_suffix)
        table.add_row(
            summary.config,
            tagged if summary.inst else "none",
            f"{summary.asr:.4f}",
            also,
            str(summary.responses),
        )
    out.print(table)
    rows = _under_test_rows(result.under_test)
    rows += [
        (
            "prompts",
            f"{result.under_test.get('prompts')}, template {result.under_test.get('template')}, judge {result.under_test.get('judge')}",
        ),
        ("generated", f"{result.generated_tokens:,} tokens in {result.seconds:.1f} s"),
        ("responses", str(result.out)),
    ]
    if result.reused:
        rows.append(("reused", ", ".join(result.reused)))
    out.print(key_value_table("model under test", rows))


def utility_result(result: UtilityResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    rows = _under_test_rows(result.under_test)
    if result.perplexity is not None:
        rows.append(
            (
                "perplexity",
                f"{result.perplexity:.4f} ({result.windows} windows of {result.seqlen} tokens)",
            )
        )
    if result.kl is not None:
        detail = result.kl_detail or {}
        prompts = detail.get("prompts") or {}
        rows.append(
            (
                "KL from dense",
                f"{result.kl:.4g} nats ({prompts.get('count')} prompts of {prompts.get('name')}, "
                f"first {detail.get('positions')} response positions)",
            )
        )
    for task, accuracy in result.zero_shot.items():
        rows.append((task, f"{accuracy:.4f}"))
    if result.zero_shot_mean is not None:
        rows.append(("zero-shot mean", f"{result.zero_shot_mean:.4f}"))
    rows += [("time", f"{result.seconds:.1f} s"), ("results", str(result.out))]
    out.print(key_value_table("utility", rows))


def finetune_result(result: Any, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    rows = [("model", str(result.out)), ("mode", result.mode)]
    if result.mask is not None:
        rows.append(("mask", f"{result.mask} ({result.masked_weights:,} weights)"))
    if result.steps:
        per_step = result.seconds_per_step or 0.0
        rows += [
            ("pairs", f"{result.pairs_used} ({result.pairs_too_long} too long, left out)"),
            ("trained", f"{result.trained_parameters:,} parameters"),
            ("steps", f"{result.steps} in {result.training_seconds:.1f} s, {per_step:.2f} s each"),
            ("loss", f"{result.losses[0]:.4f} → {result.losses[-1]:.4f}"),
        ]
    rows += [
        ("time", f"{result.seconds:.1f} s"),
        ("peak memory", human_bytes(result.peak_memory_bytes)),
    ]
    out.print(key_value_table("finetune", rows))


def report(result: Report, as_json: bool) -> None:
    rows = result.rows
    if as_json:
        print_json([row.to_json() for row in rows])
        _report_files(result)
        return
    # Only the configurations that were run: a study of one configuration gets one column.
    columns = [(t, m) for t, m in REPORT_COLUMNS if any(m in row.asr for row in rows)]
    legend = "; ".join(f"{t}: {COLUMN_LEGENDS[t]}" for t, _ in columns if t in COLUMN_LEGENDS)
    table = Table(
        title="results: ASR with instruction tags"
        + (f" ({legend})" if legend else "")
        + ", perplexity"
        + (", KL from the dense model" if any(row.kl is not None for row in rows) else ""),
        title_justify="left",
    )
    table.add_column("model under test", no_wrap=True)
    table.add_column("sparse %", justify="right")
    ranks = any(row.removed_rank_fraction is not None for row in rows)
    if ranks:  # rank edits remove ranks, not weights
        table.add_column("rank %", justify="right")
    for title, _ in columns:
        table.add_column(title, justify="right")
    table.add_column("PPL", justify="right", no_wrap=True, min_width=8)
    kl = any(row.kl is not None for row in rows)
    if kl:
        table.add_column("KL", justify="right", no_wrap=True)
    for row in rows:
        asr = []
        for _, metric in columns:
            value = row.asr.get(metric)
            mark = "*" if row.mostly_degenerate(metric) else ""
            # Sampled: any of n (the paper's figure) / the mean over samples, which still
            # separates models where any-of-n saturates.
            mean = row.asr.get(f"{metric}_sample_mean")
            if value is None:  # not run for this row (e.g. a control in fewer settings)
                asr.append("-")
                continue
            cell = f"{value:.2f}" + (f"/{mean:.2f}" if mean is not None else "")
            asr.append(cell + mark)
        rank_cell = (
            ["-" if row.removed_rank_fraction is None else f"{100 * row.removed_rank_fraction:.2f}"]
            if ranks
            else []
        )
        table.add_row(
            row.label,
            "-" if row.actual_sparsity is None else f"{100 * row.actual_sparsity:.2f}",
            *rank_cell,
            *asr,
            "-" if row.perplexity is None else _compact_float(row.perplexity),
            *((["-" if row.kl is None else f"{row.kl:.3g}"]) if kl else []),
        )
    out.print(table)
    if any(row.mostly_degenerate(m) for row in rows for _, m in columns):
        out.print(
            "*: half or more of the successful responses are degenerate (repetition or word salad)"
        )
    _report_files(result)


def edit_result(result: EditResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    title = "edit already complete, nothing to do" if result.already_complete else "rank edit"
    rows = [
        ("edit", result.name),
        ("file", str(result.path)),
        ("mode", result.mode),
        ("modules", str(result.modules)),
        ("rank removed", f"{100 * result.removed_rank_fraction:.3f}% of all modules' rank"),
        ("seconds", f"{result.seconds:.1f}"),
    ]
    if result.saved_model is not None:
        rows.append(("saved model", str(result.saved_model)))
    out.print(key_value_table(title, rows))


def _report_files(result: Report) -> None:
    """Where the figures and the document went: on stderr, beside the progress output."""
    for figure in result.figures:
        console.print(
            f"figure: {', '.join(str(f) for f in figure.files)}", highlight=False, soft_wrap=True
        )
    if result.markdown_file is not None:
        console.print(f"markdown: {result.markdown_file}", highlight=False, soft_wrap=True)


def _compact_float(value: float) -> str:
    """Perplexities of destroyed models run to millions: keep the column narrow."""
    return f"{value:.2f}" if value < 1e5 else f"{value:.2e}"


def search_result(result: SearchResult, as_json: bool) -> None:
    """A search's Pareto front as a table (parameters, size, refusal, KL), the dense model and
    the random control."""
    if as_json:
        print_json(result.to_json())
        return
    if result.selection:
        _selection(result)
        return
    amount = result.summary.amount_name
    amount_title = "rank removed" if amount == "removed_rank_fraction" else "sparsity"
    measure = result.request.get("refusal", "generation")
    table = Table(
        title=f"search {result.name}: Pareto front of {result.summary.trials_counted()} "
        f"({result.trials_run} run now)",
        title_justify="left",
    )
    table.add_column("trial", justify="right")
    params = sorted({k for t in result.front for k in t.get("params", {})})
    for name in params:
        table.add_column(name, justify="right")
    table.add_column(amount_title, justify="right")
    table.add_column("refusal" if measure == "generation" else "refusal score", justify="right")
    counted = measure == "score"  # the front's points also counted by generation
    if counted:
        table.add_column("refusal, counted", justify="right")
    table.add_column("KL", justify="right")

    def value(v: Any, integer: bool = False) -> str:
        if not isinstance(v, (int, float)):
            return "-"
        return f"{int(v)}" if integer else f"{v:.4g}"

    def row(label: str, entry: dict[str, Any], style: str | None = None) -> None:
        cells = [label]
        for name in params:
            given = (entry.get("params") or {}).get(name)
            cells.append(value(given, integer=isinstance(given, int)))
        size = entry.get(amount)
        cells.append(f"{size:.3%}" if isinstance(size, float) else "-")
        cells.append(value(entry.get("refusal")))
        if counted:
            cells.append(value(entry.get("counted_refusal")))
        cells.append(value(entry.get("kl")))
        table.add_row(*cells, style=style)

    row("dense", result.dense, "bold")
    for entry in result.front:
        row(str(entry.get("index")), entry)
    if result.control:
        row(f"random ({result.control.get('of_index')})", result.control, "dim")
    out.print(table)
    lines = [f"search folder: {result.directory}"]
    if result.figure is not None:
        lines.append(f"figure: {result.figure}.png, .svg")
    if result.kept:
        lines.append(f"kept: {', '.join(result.kept)}")
    if result.best:
        within = "" if result.best.get("within_limit") else " (none within the limit: the nearest)"
        lines.append(
            f"best by {result.best.get('rule')}: trial {result.best.get('index')} as "
            f"{result.best.get('name')}{within}"
        )
    out.print("\n".join(lines), markup=False)


def _selection(result: SearchResult) -> None:
    """`search --select reference`: every candidate's scores, why it was discarded, the choice."""
    selection = result.selection or {}
    table = Table(
        title=f"search {result.name}: the reference's selection over "
        f"{len(selection['candidates'])} candidates",
        title_justify="left",
    )
    for column in ("layer", "position", "KL", "bypass", "induce"):
        table.add_column(column, justify="right")
    table.add_column("discarded")

    def number(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, (int, float)) else "-"

    chosen = (selection.get("chosen") or {}).get("params")
    for entry in selection["candidates"]:
        params = entry["params"]
        table.add_row(
            str(params["direction_layer"]),
            str(params["direction_position"]),
            number(entry.get("kl")),
            number(entry.get("bypass")),
            number(entry.get("induce")),
            entry.get("discarded") or ("chosen" if params == chosen else ""),
            style="bold" if params == chosen else None,
        )
    out.print(table)
    lines = [f"search folder: {result.directory}"]
    if result.best:
        lines.append(f"kept: {result.best['name']} ({chosen})")
    else:
        lines.append("every candidate was discarded: nothing kept")
    out.print("\n".join(lines), markup=False)


def direction_cosines(result: Any, as_json: bool) -> None:
    """Per layer: its candidate's cosine with the next layer's and its mean with all others."""
    import math

    if as_json:
        print_json(result.to_json())
        return
    cosines = result.cosines
    table = Table(
        title=f"candidate refusal directions: {result.harmful} − {result.harmless}, position "
        f"{result.position}",
        title_justify="left",
    )
    for column in ("layer", "cos with next", "mean cos with others"):
        table.add_column(column, justify="right")
    layers = len(cosines)

    def cell(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.3f}"

    for layer in range(layers):
        others = [cosines[layer][b] for b in range(layers) if b != layer]
        valid = [v for v in others if not math.isnan(v)]
        following = cosines[layer][layer + 1] if layer + 1 < layers else math.nan
        table.add_row(
            str(layer), cell(following), cell(sum(valid) / len(valid) if valid else math.nan)
        )
    out.print(table)


def direction_in_subspaces(result: Any, as_json: bool) -> None:
    """φ(r, V_s) per writer module, and the mean per module type."""
    if as_json:
        print_json(result.to_json())
        return
    table = Table(
        title=f"share of {result.edit}'s direction inside the top-{result.rank} output subspace "
        f"of {result.statistics}",
        title_justify="left",
    )
    table.add_column("layer", justify="right")
    modules = list(dict.fromkeys(key.split("/", 1)[1] for key in result.values))
    for module in modules:
        table.add_column(short_module_name(module), justify="right")
    layers = sorted({int(key.split("/", 1)[0]) for key in result.values})
    for layer in layers:
        table.add_row(
            str(layer),
            *(
                f"{result.values[f'{layer}/{m}']:.3f}" if f"{layer}/{m}" in result.values else "-"
                for m in modules
            ),
        )
    table.caption = "‖V_sᵀ r‖²: 1 = r lies in the subspace; ≈ r_s / d_model for a random direction"
    out.print(table)


def any_comparison(result: Any, as_json: bool) -> None:
    """Whichever comparison `compare` computed, rendered as its kind is."""
    from wandacli.analysis.compare import Comparison
    from wandacli.analysis.directions import DirectionCosines, DirectionInSubspaces
    from wandacli.analysis.subspaces import SubspaceComparison

    if isinstance(result, Comparison):
        comparison(result, as_json=as_json)
    elif isinstance(result, SubspaceComparison):
        subspace_comparison(result, as_json=as_json)
    elif isinstance(result, DirectionCosines):
        direction_cosines(result, as_json=as_json)
    elif isinstance(result, DirectionInSubspaces):
        direction_in_subspaces(result, as_json=as_json)


def legacy_import(result: Any, as_json: bool) -> None:
    """`import-legacy`: the score set the reference's dumps became."""
    if as_json:
        print_json(result.to_json())
        return
    out.print(
        key_value_table(
            "score set imported",
            [
                ("score set", result.name),
                ("method", result.method),
                ("files", str(result.files)),
                ("file", str(result.path)),
            ],
        )
    )
