"""The study's figures, drawn with matplotlib on its headless Agg backend.

- `asr_vs_perplexity`: one point per model under test and ASR configuration;
- `sparsity_sweep`: ASR and perplexity against sparsity, one line per method, the random
  `--match-counts` controls dashed in their method's colour;
- `asr_against_steps`: the fine-tuning attack's ASR against its steps, one line per attack
  (full, a mask frozen or rewound, its random control), the transplant a point at its end;
- `jaccard_heatmap`: per layer × module, the Jaccard index of two top sets (compare's figure).

Every figure is deterministic: a fixed style (matplotlib's defaults plus the overrides below,
whatever the user's matplotlibrc says), no date or software version in the files, and a fixed
SVG id salt, so a rerun on the same data rewrites the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wandacli.core.metrics import metric_order, metric_parts, metric_title
from wandacli.core.paths import PLOT_FORMATS
from wandacli.reporting.labels import short_module_name
from wandacli.reporting.placement import place_labels

if TYPE_CHECKING:
    from wandacli.analysis.results import ResultRow
    from wandacli.store.summaries import SearchSummary

DPI = 150  # readable when a Markdown viewer scales the PNG down to its column width
_STYLE: dict[Any, Any] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs on every machine
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.fonttype": "path",  # text as outlines: the SVG looks the same without the font
    "svg.hashsalt": "wandacli",  # fixed ids inside the SVG
}
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
# Marker per ASR configuration; filled with instruction tags, hollow without.
_CONFIG_MARKERS = {
    "ASR_basic": "o",
    "ASR_basic_nosys": "s",
    "ASR_multiple_nosys": "^",
    "ASR_gcg": "D",
}
_DENSE_COLOUR = "black"
_BASELINE_COLOUR = "0.55"


@dataclass(frozen=True)
class Figure:
    """One written figure: its stem (files `<stem>.png` and `<stem>.svg`) and a caption."""

    stem: Path
    title: str
    caption: str

    @property
    def files(self) -> list[Path]:
        return [with_format(self.stem, fmt) for fmt in PLOT_FORMATS]


def with_format(stem: Path, fmt: str) -> Path:
    """`stem` + `.fmt` (not `with_suffix`: stems such as `top0.01-wanda` hold dots)."""
    return stem.parent / f"{stem.name}.{fmt}"


@contextmanager
def _pyplot() -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, and the same output everywhere
    import matplotlib.pyplot as plt

    # matplotlib's defaults, not the user's matplotlibrc, then ours: the same figure everywhere.
    with matplotlib.style.context("default"), matplotlib.rc_context(rc=_STYLE):
        yield plt


def _save(figure: Any, stem: Path, formats: Sequence[str] = PLOT_FORMATS) -> None:
    import io

    from wandacli.core.durable import atomic_write_bytes

    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=DPI, metadata=_METADATA[fmt])
        atomic_write_bytes(with_format(stem, fmt), buffer.getvalue())


def _method_colours(rows: Sequence[ResultRow]) -> dict[str, Any]:
    import matplotlib

    methods = sorted({r.method for r in rows if r.method not in ("dense", "random")})
    palette = matplotlib.colormaps["tab10"]
    return {method: palette(i % 10) for i, method in enumerate(methods)}


def _primary_model(rows: Sequence[ResultRow]) -> str | None:
    """The model the masks were made for: the model of the masked rows (else of the first);
    a fine-tuned model is a model of its own, never the one masks were made for."""
    masked = [r.model for r in rows if r.method != "dense" and r.model and not r.finetune]
    if masked:
        return masked[0]
    return rows[0].model if rows else None


def _role(row: ResultRow, primary: str | None) -> str:
    if row.method == "dense":
        return "dense" if row.model == primary or primary is None else "baseline"
    return "control" if row.is_control or row.method == "random" else "masked"


def _asr_metrics(rows: Sequence[ResultRow]) -> list[str]:
    found = {m for row in rows for m in row.asr if not m.endswith("_sample_mean")}
    return sorted(found, key=metric_order)


def asr_vs_perplexity(rows: Sequence[ResultRow], stem: Path) -> Figure | None:
    """ASR against perplexity (log scale), one point per model under test and configuration."""
    metrics = _asr_metrics(rows)
    shown = [r for r in rows if r.perplexity is not None and any(m in r.asr for m in metrics)]
    if not shown:
        return None
    primary = _primary_model(rows)
    colours = _method_colours(rows)
    with _pyplot() as plt:
        figure, axes = plt.subplots(figsize=(9.0, 5.4))
        labels = []
        degenerate_shown = False
        for row in shown:
            role = _role(row, primary)
            colour = {"dense": _DENSE_COLOUR, "baseline": _BASELINE_COLOUR}.get(
                role, colours.get(row.method, _BASELINE_COLOUR) if role != "control" else "0.35"
            )
            highest = None
            for metric in metrics:
                if metric not in row.asr:
                    continue
                config, inst = metric_parts(metric)
                size = 90 if role == "dense" else 42
                axes.scatter(
                    [row.perplexity],
                    [row.asr[metric]],
                    marker=_CONFIG_MARKERS.get(config, "o"),
                    s=size,
                    facecolors="none" if inst is False else colour,
                    edgecolors=colour,
                    linewidths=1.6 if role == "dense" else 1.0,
                    zorder=4 if role == "dense" else 3,
                )
                if row.mostly_degenerate(metric):  # its ASR counts gibberish
                    axes.scatter(
                        [row.perplexity],
                        [row.asr[metric]],
                        marker="x",
                        s=size * 1.8,
                        color="tab:red",
                        linewidths=1.4,
                        zorder=5,
                    )
                    degenerate_shown = True
                if highest is None or row.asr[metric] > highest:
                    highest = row.asr[metric]
            style = {"fontweight": "bold"} if role == "dense" else {}
            text = f"{row.label} (dense)" if role == "dense" and row.label != "dense" else row.label
            labels.append((float(row.perplexity or 0.0), float(highest or 0.0), text, style))
        axes.set_xscale("log")
        axes.set_ylim(-0.08, 1.12)
        axes.set_xlabel("perplexity (log scale; lower is better)")
        axes.set_ylabel("attack success rate")
        axes.set_title("Safety against utility: one point per model under test")
        _widen_log_axis(axes, [r.perplexity for r in shown if r.perplexity])
        _legends_for_configs_and_methods(axes, metrics, colours, rows, primary)
        figure.tight_layout()
        place_labels(axes, sorted(labels, key=lambda p: (p[3] == {}, -p[1], p[0])))
        _save(figure, stem)
        plt.close(figure)
    hidden = len(rows) - len(shown)
    caption = (
        "Each point is one model under test; marker = ASR configuration (filled: with "
        "instruction tags, hollow: without), colour = pruning method, black = the dense model."
    )
    if degenerate_shown:
        caption += (
            " A red × marks a point where half or more of the successful responses are "
            "degenerate (repetition or word salad): that ASR counts gibberish, not answers."
        )
    if hidden:
        caption += f" {hidden} model(s) without both ASR and perplexity are not shown."
    return Figure(stem, "Attack success rate against perplexity", caption)


def _attack_label(attack: dict[str, Any]) -> str:
    """full; freeze <mask>; rewind <mask>; transplant <mask> (a mask given by name or path)."""
    mode, mask = str(attack.get("mode")), attack.get("mask")
    return mode if not mask else f"{mode} {Path(str(mask)).name.removesuffix('.h5')}"


def attack_curves(rows: Sequence[ResultRow]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What `asr_against_steps` draws: per ASR metric shown (a setting's per-sample mean
    where it has one), per attack, its (step, ASR) points in step order, from the aligned
    model's at step 0 (the transplant: its own point only)."""
    attacked = [r for r in rows if r.finetune and r.asr]
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for metric in _asr_metrics(attacked):
        sampled = f"{metric}_sample_mean"
        shown = sampled if any(sampled in r.asr for r in attacked) else metric
        lines: dict[str, list[tuple[int, float]]] = {}
        starts: dict[str, ResultRow | None] = {}
        for row in attacked:
            if shown in row.asr:
                attack = row.finetune or {}
                point = (int(attack.get("step", 0)), row.asr[shown])
                label = _attack_label(attack)
                lines.setdefault(label, []).append(point)
                starts.setdefault(label, _aligned_row(rows, attack))
        for label, points in lines.items():
            points.sort()
            start = starts.get(label)
            if start is not None and shown in start.asr and not label.startswith("transplant"):
                points.insert(0, (0, start.asr[shown]))
        curves[shown] = dict(sorted(lines.items()))
    return curves


def _aligned_row(rows: Sequence[ResultRow], attack: dict[str, Any]) -> ResultRow | None:
    """The row of the model an attack started from: the evaluated model it names
    (`aligned_model`), else the row labelled `dense` (the pipeline's name for it); never
    another unattacked model, such as the study's baseline before alignment."""
    unattacked = [r for r in rows if not r.finetune and r.asr]
    aligned = attack.get("aligned_model")
    named = [r for r in unattacked if aligned is not None and r.model == str(aligned)]
    if named:
        return next((r for r in named if r.method == "dense"), named[0])
    return next((r for r in unattacked if r.label == "dense"), None)


def asr_against_steps(rows: Sequence[ResultRow], stem: Path) -> Figure | None:
    """The fine-tuning attack's ASR against its steps (`finetune --save-steps`): one panel per
    ASR setting, one line per attack (`attack_curves`), the random control dashed, the
    transplant a star."""
    curves = attack_curves(rows)
    if not curves:
        return None
    with _pyplot() as plt:
        figure, panels = plt.subplots(
            1, len(curves), figsize=(4.6 * len(curves), 4.2), squeeze=False, sharey=True
        )
        palette = plt.get_cmap("tab10")
        for axes, (metric, lines) in zip(panels[0], curves.items(), strict=True):
            for index, (label, points) in enumerate(lines.items()):
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                if label.startswith("transplant"):
                    axes.scatter(xs, ys, marker="*", s=140, color=palette(index), label=label)
                else:
                    style = "--" if label.split(" ")[-1].startswith("random") else "-"
                    axes.plot(xs, ys, style, marker="o", color=palette(index), label=label)
            axes.set_title(metric_title(metric))
            axes.set_xlabel("fine-tuning steps")
            axes.set_ylim(-0.05, 1.05)
        panels[0][0].set_ylabel("attack success rate")
        panels[0][-1].legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        _save(figure, stem)
        plt.close(figure)
    caption = (
        "The fine-tuning attack's ASR on held-out prompts after each saved step, from the "
        "aligned model's at step 0: full fine-tuning, and with the attributed weights frozen or "
        "rewound, beside a random mask of the same counts (dashed); a star: the attacked model "
        "with the attributed weights transplanted back from the aligned one."
    )
    return Figure(stem, "Attack success rate against fine-tuning steps", caption)


def _widen_log_axis(axes: Any, values: Sequence[float]) -> None:
    """Room on the log axis for labels beside the outermost points."""
    low, high = min(values), max(values)
    span = max(math.log10(high) - math.log10(low), 0.5)
    axes.set_xlim(10 ** (math.log10(low) - 0.12 * span), 10 ** (math.log10(high) + 0.35 * span))


def _legends_for_configs_and_methods(
    axes: Any,
    metrics: Sequence[str],
    colours: dict[str, Any],
    rows: Sequence[ResultRow],
    primary: str | None,
) -> None:
    from matplotlib.lines import Line2D

    config_handles = []
    for metric in metrics:
        config, inst = metric_parts(metric)
        config_handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker=_CONFIG_MARKERS.get(config, "o"),
                markerfacecolor="none" if inst is False else "0.3",
                markeredgecolor="0.3",
                label=metric,
            )
        )
    roles = {_role(r, primary) for r in rows}
    method_handles = [
        Line2D([], [], linestyle="none", marker="o", color=colour, label=method)
        for method, colour in colours.items()
    ]
    if "control" in roles:
        method_handles.append(
            Line2D([], [], linestyle="none", marker="o", color="0.35", label="random control")
        )
    method_handles.append(
        Line2D([], [], linestyle="none", marker="o", color=_DENSE_COLOUR, label="dense")
    )
    if "baseline" in roles:
        method_handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                color=_BASELINE_COLOUR,
                label="other models, dense",
            )
        )
    # Beside the axes, not on them: no legend covers a point or a label.
    first = axes.legend(
        handles=config_handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=7,
        title="configuration",
        title_fontsize=7,
    )
    axes.add_artist(first)
    axes.legend(
        handles=method_handles,
        loc="lower left",
        bbox_to_anchor=(1.02, 0.0),
        fontsize=7,
        title="colour",
        title_fontsize=7,
    )


def sweep_lines(rows: Sequence[ResultRow]) -> dict[tuple[str, bool], list[ResultRow]]:
    """The sweep figure's lines: (method, is random control) → its rows by sparsity. A
    `--match-counts` control joins the line of the method whose mask it matches."""
    primary = _primary_model(rows)
    by_label = {r.label: r for r in rows}
    lines: dict[tuple[str, bool], list[ResultRow]] = {}
    for row in rows:
        role = _role(row, primary)
        if row.actual_sparsity is None or role not in ("masked", "control"):
            continue
        method = row.method
        if role == "control":
            matched = by_label.get(row.matches or "")
            method = matched.method if matched is not None else "random"
        lines.setdefault((method, role == "control"), []).append(row)
    return {
        key: sorted(members, key=lambda r: r.actual_sparsity or 0.0)
        for key, members in sorted(lines.items())
    }


def sparsity_sweep(rows: Sequence[ResultRow], stem: Path) -> Figure | None:
    """ASR (one panel per configuration) and perplexity against sparsity: one line per method,
    its random controls dashed in the same colour, the dense model as a dotted level."""
    primary = _primary_model(rows)
    masked = [r for r in rows if _role(r, primary) == "masked" and r.actual_sparsity is not None]
    if not masked:
        return None
    metrics = _asr_metrics(rows)
    colours = _method_colours(rows)
    lines = sweep_lines(rows)
    dense = [r for r in rows if _role(r, primary) == "dense"]
    panels = [*metrics, "perplexity"]
    columns = min(3, len(panels))
    grid_rows = math.ceil(len(panels) / columns)
    with _pyplot() as plt:
        figure, axes_grid = plt.subplots(
            grid_rows, columns, figsize=(4.3 * columns, 3.4 * grid_rows + 0.6), squeeze=False
        )
        for index, panel in enumerate(panels):
            axes = axes_grid[index // columns][index % columns]
            for (method, is_control), members in lines.items():
                values = [
                    (
                        100 * (r.actual_sparsity or 0.0),
                        r.perplexity if panel == "perplexity" else r.asr.get(panel),
                    )
                    for r in members
                ]
                values = [(x, y) for x, y in values if y is not None]
                if not values:
                    continue
                axes.plot(
                    [x for x, _ in values],
                    [y for _, y in values],
                    linestyle="--" if is_control else "-",
                    marker="o",
                    markersize=4,
                    markerfacecolor="white" if is_control else None,
                    color=colours.get(method, "0.35"),
                    zorder=4 if is_control else 3,  # a hollow control stays visible on top
                    label=_line_label(method, is_control),
                )
            for row in dense:
                level = row.perplexity if panel == "perplexity" else row.asr.get(panel)
                if level is not None:
                    axes.axhline(
                        level, color=_DENSE_COLOUR, linestyle=":", linewidth=1.2, label="dense"
                    )
            if panel == "perplexity":
                axes.set_yscale("log")
                axes.set_ylabel("perplexity (log scale)")
            else:
                axes.set_ylim(-0.05, 1.05)
                axes.set_ylabel("attack success rate")
            axes.set_title(panel, fontsize=9)
            axes.set_xlabel("sparsity % (weights removed)")
        for index in range(len(panels), grid_rows * columns):
            axes_grid[index // columns][index % columns].set_visible(False)
        handles, labels = axes_grid[0][0].get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        figure.legend(
            unique.values(),
            unique.keys(),
            loc="lower center",
            ncol=min(4, len(unique)),
            fontsize=8,
            frameon=False,
        )
        figure.suptitle("ASR and perplexity as more weights are removed", fontsize=10)
        figure.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(unique) / 4), 1, 1))
        _save(figure, stem)
        plt.close(figure)
    return Figure(
        stem,
        "ASR and perplexity against sparsity",
        "One line per pruning method over its masks (the set difference's p/q grid, top-k "
        "ratios); dashed: random masks with the same per-matrix counts; dotted: the dense model.",
    )


def _line_label(method: str, is_control: bool) -> str:
    if not is_control:
        return method
    return "random control" if method == "random" else f"random, as {method}"


def jaccard_heatmap(
    jaccard: dict[tuple[int, str], float],
    a: str,
    b: str,
    stem: Path,
    formats: Sequence[str] = PLOT_FORMATS,
) -> Figure:
    """Layers across, module types down, each cell the Jaccard index of A's and B's top sets."""
    layer_module_heatmap(
        jaccard, f"Jaccard index of top sets: {a} vs {b}", "Jaccard", stem, formats
    )
    return Figure(
        stem,
        f"Overlap of {a} and {b} per layer and module",
        "Jaccard index |A∩B| / |A∪B| of the two top sets in every matrix: low where the weights "
        "that matter for one set are not those that matter for the other.",
    )


def subspace_heatmap(
    similarity: dict[tuple[int, str], float],
    a: str,
    b: str,
    ranks: tuple[int, int],
    stem: Path,
    formats: Sequence[str] = PLOT_FORMATS,
) -> Figure:
    """Layers across, module types down, each cell φ of A's and B's top output subspaces."""
    rank_text = f"r = {ranks[0]}" if ranks[0] == ranks[1] else f"r = {ranks[0]}, {ranks[1]}"
    layer_module_heatmap(
        similarity, f"Subspace similarity φ ({rank_text}): {a} vs {b}", "φ", stem, formats
    )
    return Figure(
        stem,
        f"Rank-level overlap of {a} and {b} ({rank_text})",
        "Subspace similarity φ = ‖V_aᵀ V_b‖²_F / min(r_a, r_b) of the two sets' top output "
        "directions (ActSVD) in every matrix: 1 where one set's top ranks hold the other's.",
    )


def layer_module_heatmap(
    values: dict[tuple[int, str], float],
    title: str,
    label: str,
    stem: Path,
    formats: Sequence[str] = PLOT_FORMATS,
) -> None:
    """A [0, 1] value per (layer, module): layers across, module types down."""

    layers = sorted({layer for layer, _ in values})
    modules: list[str] = []
    for _, module in sorted(values, key=lambda key: key[0]):
        if module not in modules:
            modules.append(module)
    grid = [[values.get((layer, m), math.nan) for layer in layers] for m in modules]
    with _pyplot() as plt:
        figure, axes = plt.subplots(
            figsize=(max(4.0, 1.6 + 0.26 * len(layers)), 1.3 + 0.32 * len(modules))
        )
        image = axes.imshow(
            grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest"
        )
        step = 1 if len(layers) <= 32 else math.ceil(len(layers) / 32)
        axes.set_xticks(
            range(0, len(layers), step), [str(layer) for layer in layers[::step]], fontsize=7
        )
        axes.set_yticks(range(len(modules)), [short_module_name(m) for m in modules], fontsize=8)
        axes.grid(False)
        axes.set_xlabel("decoder layer")
        axes.set_ylabel("module")
        axes.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axes, label=label, fraction=0.03, pad=0.02)
        figure.tight_layout()
        _save(figure, stem, formats)
        plt.close(figure)


def search_front(summary: SearchSummary, stem: Path) -> Figure | None:
    """A search: refusal against KL, every complete trial a dot, the Pareto front drawn as a
    step line, the dense model and the random control marked."""
    trials = summary.complete_trials
    if not trials:
        return None
    front = summary.front
    dense = summary.dense or {}
    control = summary.control
    # KL spans orders of magnitude: a symmetric log axis keeps the dense model's 0 in view.
    floor = min([t["kl"] for t in trials if t["kl"] > 0] or [1e-4])
    with _pyplot() as plt:
        figure, axes = plt.subplots(figsize=(7.5, 4.8))
        axes.scatter(
            [t["kl"] for t in trials],
            [t["refusal"] for t in trials],
            s=22,
            color="tab:blue",
            alpha=0.55,
            label=f"trial ({len(trials)})",
            zorder=3,
        )
        if front:
            ordered = sorted(front, key=lambda t: t["kl"])
            axes.step(
                [t["kl"] for t in ordered],
                [t["refusal"] for t in ordered],
                where="post",
                color="tab:red",
                linewidth=1.4,
                label=f"Pareto front ({len(front)})",
                zorder=4,
            )
            axes.scatter(
                [t["kl"] for t in ordered],
                [t["refusal"] for t in ordered],
                s=36,
                color="tab:red",
                zorder=5,
            )
        if dense:
            axes.scatter(
                [dense.get("kl", 0.0)],
                [dense["refusal"]],
                s=90,
                marker="*",
                color=_DENSE_COLOUR,
                label="dense model",
                zorder=6,
            )
        if control:
            axes.scatter(
                [control["kl"]],
                [control["refusal"]],
                s=60,
                marker="X",
                color="0.35",
                label=f"random control (size of trial {control.get('of_index')})",
                zorder=6,
            )
        best = summary.best or {}
        chosen = [t for t in front if best and t.get("index") == best.get("index")]
        if chosen:
            axes.scatter(
                [chosen[0]["kl"]],
                [chosen[0]["refusal"]],
                s=160,
                facecolors="none",
                edgecolors="black",
                linewidths=1.5,
                label=f"kept as {best.get('name')} ({best.get('rule')})",
                zorder=7,
            )
        axes.set_xscale("symlog", linthresh=floor)
        axes.set_xlabel("KL divergence from the dense model on harmless prompts (nats)")
        measure = summary.request.get("refusal", "generation")
        axes.set_ylabel("refusal rate" if measure == "generation" else "refusal score (log-odds)")
        name = summary.name
        prompts = summary.prompts.get("name", "?")
        axes.set_title(f"search {name}: refusal on {prompts} (search prompts) against KL")
        axes.legend(loc="best", fontsize=8)
        figure.tight_layout()
        _save(figure, stem)
        plt.close(figure)
    caption = (
        f"Search {name}: each dot is a trial; the red line is the Pareto front (lower refusal "
        "and lower KL are better); measured on the search prompts, not on held-out ones."
    )
    return Figure(stem, f"Search {name}: refusal against KL", caption)


def direction_cosines_heatmap(
    cosines: Any,
    harmful: str,
    harmless: str,
    position: int,
    stem: Path,
    formats: Sequence[str] = PLOT_FORMATS,
) -> Figure:
    """The candidate refusal directions' cosine similarities across layers (layers × layers)."""
    import numpy as np

    with _pyplot() as plt:
        figure, axes = plt.subplots(figsize=(6.4, 5.4))
        image = axes.imshow(
            np.ma.masked_invalid(cosines), cmap="RdBu_r", vmin=-1, vmax=1, origin="lower"
        )
        axes.set_xlabel("layer (hidden_states[l])")
        axes.set_ylabel("layer (hidden_states[l])")
        axes.set_title(f"cosine of candidate directions at position {position}")
        figure.colorbar(image, ax=axes, label="cosine")
        figure.tight_layout()
        _save(figure, stem, formats)
        plt.close(figure)
    return Figure(
        stem,
        f"Candidate directions' cosines ({harmful} − {harmless})",
        "Each cell the cosine of two layers' candidate refusal directions at one prompt "
        "position; blank: no direction (the two means are equal there).",
    )
