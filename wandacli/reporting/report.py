"""The study's results table: every model under test in a results directory (one
subdirectory each, as eval-attack and eval-utility write them) in one row."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wandacli.analysis.agreement import JudgeAgreement, judge_agreements
from wandacli.analysis.results import ResultRow, collect
from wandacli.core.durable import ensure_writable_directory
from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.metrics import metric_order, metric_title
from wandacli.core.naming import file_safe_name
from wandacli.store.schema import SEARCH_SUMMARY, Store
from wandacli.store.summaries import SearchSummary

if TYPE_CHECKING:
    from wandacli.reporting.figures import Figure


@dataclass
class Report:
    rows: list[ResultRow]
    figures: list[Figure] = field(default_factory=list)
    markdown_file: Path | None = None
    searches: list[SearchSummary] = field(default_factory=list)  # each search's search.json
    agreements: list[JudgeAgreement] = field(default_factory=list)  # where two judges ran


def build_report(
    results_dir: Path,
    *,
    markdown_file: Path | None = None,
    plots_dir: Path | None = None,
    compare_dir: Path | None = None,
    searches_store: Path | None = None,
) -> Report:
    """The results table; with `plots_dir`, the study's figures (PNG and SVG) from the results,
    from `compare --csv` files in `compare_dir` and from the searches in `searches_store`;
    with `markdown_file`, all of it as a Markdown document that embeds the figures."""
    rows = collect(results_dir)
    comparisons = read_comparisons(compare_dir) if compare_dir is not None else []
    subspaces = read_subspaces(compare_dir) if compare_dir is not None else []
    report = Report(
        rows,
        searches=read_searches(searches_store) if searches_store else [],
        agreements=judge_agreements(results_dir),
    )
    # Where the outputs go, checked once the inputs are read and before any figure is drawn:
    # a folder that cannot be written, or a Markdown file that is a folder, is one line.
    if plots_dir is not None:
        ensure_writable_directory(plots_dir, "--plots")
    if markdown_file is not None:
        if markdown_file.is_dir():
            raise ConfigError(
                f"--markdown {markdown_file} is a directory: pass a file name such as "
                f"{markdown_file / 'report.md'}"
            )
        ensure_writable_directory(markdown_file.parent, "--markdown")
    if plots_dir is not None:
        from wandacli.reporting import figures

        made = [
            figures.asr_vs_perplexity(rows, plots_dir / "asr-vs-perplexity"),
            figures.sparsity_sweep(rows, plots_dir / "sparsity-sweep"),
            figures.asr_against_steps(rows, plots_dir / "asr-against-steps"),
        ]
        for (a, b), jaccard in comparisons:
            stem = plots_dir / f"jaccard-{file_safe_name(a)}-vs-{file_safe_name(b)}"
            made.append(figures.jaccard_heatmap(jaccard, a, b, stem))
        for (a, b, ranks), similarity in subspaces:
            stem = plots_dir / f"subspaces-{file_safe_name(a)}-vs-{file_safe_name(b)}-r{ranks[0]}"
            made.append(figures.subspace_heatmap(similarity, a, b, ranks, stem))
        for summary in report.searches:
            stem = plots_dir / f"search-{file_safe_name(summary.name)}"
            made.append(figures.search_front(summary, stem))
        report.figures = [figure for figure in made if figure is not None]
    if markdown_file is not None:
        from wandacli.core.durable import atomic_write_text

        atomic_write_text(markdown_file, study_markdown(report, markdown_file.parent))
        report.markdown_file = markdown_file
    return report


def read_searches(store_root: Path) -> list[SearchSummary]:
    """Every search's summary in the store (`STORE/searches/<name>/search.json`), by name."""
    store = Store(store_root)
    if not store_root.is_dir():
        raise StoreError(f"store {store_root} does not exist: pass the store the searches ran in")
    return [
        SearchSummary.read(store.search_dir(name) / SEARCH_SUMMARY) for name in store.search_names()
    ]


def read_comparisons(
    compare_dir: Path,
) -> list[tuple[tuple[str, str], dict[tuple[int, str], float]]]:
    """Per pair of inputs in the `compare --csv` files of `compare_dir`: Jaccard per (layer,
    module), in file order."""
    if not compare_dir.is_dir():
        raise StoreError(
            f"compare directory {compare_dir} does not exist: pass the folder holding `wandacli compare --csv` files"
        )
    pairs: dict[tuple[str, str], dict[tuple[int, str], float]] = {}
    for path in sorted(compare_dir.glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            needed = {"a", "b", "layer", "module", "jaccard"}
            if not needed <= set(reader.fieldnames or []):
                continue  # some other CSV: not compare's
            try:
                for record in reader:
                    if record["layer"] == "all":  # the pair's overall row
                        continue
                    value = (
                        float(record["jaccard"])
                        if record["jaccard"] not in ("", "nan")
                        else float("nan")
                    )
                    pair = pairs.setdefault((record["a"], record["b"]), {})
                    pair[(int(record["layer"]), record["module"])] = value
            except ValueError as exc:
                raise StoreError(
                    f"{path} has a malformed row ({exc}): rerun the compare that wrote it"
                ) from exc
    return list(pairs.items())


def read_subspaces(
    compare_dir: Path,
) -> list[tuple[tuple[str, str, tuple[int, int]], dict[tuple[int, str], float]]]:
    """Per pair of rank-statistics sets in the `compare --csv` files of `compare_dir`: φ per
    (layer, module) at the pair's first (smallest) ranks."""
    found: dict[tuple[str, str], dict[tuple[int, int], dict[tuple[int, str], float]]] = {}
    for path in sorted(compare_dir.glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            needed = {"a", "b", "layer", "module", "rank_a", "rank_b", "subspace_similarity"}
            if not needed <= set(reader.fieldnames or []):
                continue
            try:
                for record in reader:
                    ranks = (int(record["rank_a"]), int(record["rank_b"]))
                    value = record["subspace_similarity"]
                    by_ranks = found.setdefault((record["a"], record["b"]), {})
                    cell = (int(record["layer"]), record["module"])
                    by_ranks.setdefault(ranks, {})[cell] = float(value) if value else float("nan")
            except ValueError as exc:
                raise StoreError(
                    f"{path} has a malformed row ({exc}): rerun the compare that wrote it"
                ) from exc
    return [((a, b, min(by_ranks)), by_ranks[min(by_ranks)]) for (a, b), by_ranks in found.items()]


def study_markdown(report: Report, relative_to: Path) -> str:
    """The results table, then every figure with its caption (paths relative to the document)."""
    parts = ["# Results", "", markdown(report.rows), *prompt_notes(report.rows)]
    parts += agreement_markdown(report.agreements)
    for summary in report.searches:
        parts += search_markdown(summary)
    if report.figures:
        parts += ["## Figures", ""]
        for figure in report.figures:
            png, svg = (
                Path(os.path.relpath(path, relative_to)).as_posix() for path in figure.files
            )
            parts += [
                f"### {figure.title}",
                "",
                f"![{figure.title}]({png})",
                "",
                f"{figure.caption} ([SVG]({svg}))",
                "",
            ]
    return "\n".join(parts)


def agreement_markdown(agreements: list[JudgeAgreement]) -> list[str]:
    """Where two judges judged the same responses: how often they agree, Cohen's kappa, and
    the responses they disagree on most."""
    if not agreements:
        return []
    lines = [
        "## Judge agreement",
        "",
        "| model under test | judges | responses | agree | Cohen's κ | ASR by each |",
        "|---|---|---|---|---|---|",
    ]
    for a in agreements:
        kappa = "-" if a.kappa is None else f"{a.kappa:.3f}"
        lines.append(
            f"| {a.label} | {a.judges[0]} / {a.judges[1]} | {a.responses} | "
            f"{a.agreement:.1%} | {kappa} | {a.rates[0]:.3f} / {a.rates[1]:.3f} |"
        )
    lines.append("")
    for a in agreements:
        if a.disagreements:
            lines += [f"Most disagreed ({a.label}, {a.judges[0]} / {a.judges[1]}):", ""]
            for d in a.disagreements:
                lines.append(
                    f"- {d.run} #{d.question_id}.{d.sample}: {d.verdicts[0]} / {d.verdicts[1]} "
                    f"{d.scores_text} — {d.excerpt!r}"
                )
            lines.append("")
    return lines


def search_markdown(summary: SearchSummary) -> list[str]:
    """One search: what it searched, on which prompts, its front, the dense model, the random
    control and the point it kept as `.best`."""
    request = summary.request
    amount = summary.amount_name
    front = summary.front
    prompts = summary.prompts
    first = int(prompts.get("offset") or 0) + 1
    last = first + int(prompts.get("count") or 0) - 1
    params = sorted({k for t in front for k in t.get("params") or {}})
    ranges = ", ".join(f"{k} {low:g}:{high:g}" for k, (low, high) in summary.ranges.items())
    best = summary.best or {}
    lines = [
        f"## Search {summary.name}",
        "",
        f"{request.get('kind')} over {ranges}: {summary.trials_counted()}, scored on "
        f"{request.get('scores')}"
        + (f" and {request['utility_scores']}" if request.get("utility_scores") else "")
        + f". Search prompts: {prompts.get('name')} {first}–{last}; refusal: "
        f"{summary.objectives.get('refusal')}; KL: {summary.objectives.get('kl')}.",
        "",
        "| trial | " + " | ".join(params) + f" | {amount.replace('_', ' ')} | refusal | KL |",
        "|" + "---|" * (len(params) + 4),
    ]

    def row(label: str, entry: dict[str, Any]) -> str:
        values = [
            f"{v:g}" if isinstance(v := (entry.get("params") or {}).get(k), (int, float)) else "-"
            for k in params
        ]
        size = entry.get(amount)
        size_cell = f"{size:.3%}" if isinstance(size, (int, float)) else "-"
        return (
            f"| {label} | " + " | ".join(values) + f" | {size_cell} | "
            f"{entry.get('refusal', float('nan')):.3g} | {entry.get('kl', float('nan')):.3g} |"
        )

    lines.append(row("dense", summary.dense or {}))
    for entry in front:
        mark = " (kept as .best)" if entry.get("index") == best.get("index") else ""
        lines.append(row(f"{entry.get('index')}{mark}", entry))
    if summary.control:
        lines.append(row(f"random, size of {summary.control.get('of_index')}", summary.control))
    if best:
        lines += [
            "",
            f"Kept as {best.get('name')}: trial {best.get('index')}, by the rule "
            f"{best.get('rule')}"
            + ("" if best.get("within_limit", True) else " (no front point within it: the nearest)")
            + ".",
        ]
    return [*lines, ""]


def prompt_notes(rows: list[ResultRow]) -> list[str]:
    """Which prompts the ASRs were measured on, and for removals a search chose, which prompts
    it chose them on (never among the former: eval-attack refuses an overlap)."""
    notes = []
    sources = sorted({Path(row.prompts).name for row in rows if row.prompts})
    if sources:
        notes.append(f"ASR measured on: {', '.join(sources)} (the evaluation prompts).")
    for row in rows:
        if row.search:
            prompts = row.search.get("prompts") or {}
            first = int(prompts.get("offset") or 0) + 1
            last = first + int(prompts.get("count") or 0) - 1
            notes.append(
                f"{row.label}: chosen by search {row.search.get('name')!r} (trial "
                f"{row.search.get('trial')}) on the search prompts {prompts.get('name')} "
                f"{first}–{last}, none of them among the evaluation prompts."
            )
    return ["", *notes, ""] if notes else []


def _asr_cell(row: ResultRow, metric: str) -> str:
    """The ASR, a graded judge's mean score, and the shares of its successes that repeat
    themselves (degenerate) or are noise (word salad), where there are any."""
    if metric not in row.asr:
        return "-"
    notes = []
    if metric in row.mean_score:
        notes.append(f"score {row.mean_score[metric]:.2f}")
    if row.degenerate.get(metric):
        notes.append(f"{row.degenerate[metric]:.0%} degenerate")
    if row.word_salad.get(metric):
        notes.append(f"{row.word_salad[metric]:.0%} word salad")
    return f"{row.asr[metric]:.3f}" + (f" ({', '.join(notes)})" if notes else "")


def markdown(rows: list[ResultRow]) -> str:
    """Every figure as a Markdown table (ASR columns for every metric found)."""
    metrics = sorted({m for row in rows for m in row.asr}, key=metric_order)
    ranks = any(row.removed_rank_fraction is not None for row in rows)
    kl = any(row.kl is not None for row in rows)
    header = [
        "model under test",
        "method",
        "sparsity %",
        *(["rank removed %"] if ranks else []),
        *(metric_title(m) for m in metrics),
        "PPL",
        *(["KL"] if kl else []),
        "zero-shot",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.label,
            row.method,
            "-" if row.actual_sparsity is None else f"{100 * row.actual_sparsity:.3f}",
            *(
                [
                    "-"
                    if row.removed_rank_fraction is None
                    else f"{100 * row.removed_rank_fraction:.3f}"
                ]
                if ranks
                else []
            ),
            *(_asr_cell(row, m) for m in metrics),
            "-" if row.perplexity is None else f"{row.perplexity:.3f}",
            *((["-" if row.kl is None else f"{row.kl:.4g}"]) if kl else []),
            "-" if row.zero_shot_mean is None else f"{row.zero_shot_mean:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
