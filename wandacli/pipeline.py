"""The study as Make rules: `python -m wandacli.pipeline CONFIG OUT` prints a makefile whose
targets are the files each step writes, so `make demo` (or `make paper`) re-runs only what is
missing. The plan comes from the config's `[pipeline]` table; every command also reads the
same config for its options.

    score    the `methods` (wanda, wandg, ...) on the safety and the utility set, and with
             `rank_statistics` actsvd, with `mean_activations` mean-activations on both
    prune    the top `top_ratio` of safety scores per row (`--prune-highest`), per method;
             the set difference for every (p, q) in `pq`, from `set_difference_method`;
             with `random_control`, a random mask of the same per-matrix counts beside each
    search   each [[pipeline.searches]] entry (its options as keys), kept as <name>.best; with
             `random_control`, a random removal of its size (masks: the same counts; rank
             edits: the same rank per module; a direction: a random unit vector)
    compare  safety vs utility per method, and the methods against each other on safety; with
             mean activations the candidate directions' cosines across layers, and with rank
             statistics a searched direction's share inside the safety subspaces
    eval     eval-attack and eval-utility on the dense model and every mask and edit, and on
             each of `baseline_models` (e.g. the model before alignment), dense: the dense
             model and the searched points in `configs`, the rest in `other_configs`
    report   one results table, the study's figures (out/figures) and out/results.md
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wandacli.config.files import read_config_file
from wandacli.config.settings import WEIGHT_METHODS
from wandacli.core.errors import ConfigError, WandacliError
from wandacli.core.naming import file_safe_name
from wandacli.search.config import search_parameters

# The `search` options a [[pipeline.searches]] entry may set (the rest come from [search]).
SEARCH_KEYS = (
    "scores",
    "utility_scores",
    *search_parameters(),
    "layers",
    "modules",
    "trials",
    "startup_trials",
    "keep_best",
    "seed",
)


@dataclass(frozen=True)
class SearchPlan:
    """One `wandacli search`: its name and options; its `--keep-best` point, `<name>.best`, is
    what the study evaluates (beside a random control of its size)."""

    name: str
    options: tuple[tuple[str, str], ...]

    @property
    def option(self) -> dict[str, str]:
        return dict(self.options)

    @property
    def is_edit(self) -> bool:
        from wandacli.removal.kinds import kind_named  # noqa: F401  (kept for the registry)

        parameters = search_parameters()
        given = {parameters[key].name for key in self.option if key in parameters}
        from wandacli.removal.kinds import searchable

        return any(kind.accepts(given) and kind.family == "edit" for kind in searchable())

    @property
    def best(self) -> str:
        return f"{self.name}.best"

    @property
    def score_sets(self) -> list[str]:
        return [self.option[k] for k in ("scores", "utility_scores") if k in self.option]

    @classmethod
    def from_table(cls, table: Any, path: Path) -> SearchPlan:
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise ConfigError(f"{path}: every [[pipeline.searches]] entry needs a name")
        unknown = sorted(set(table) - {"name", *SEARCH_KEYS})
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r} in [[pipeline.searches]] {table['name']!r} "
                f"(keys: name, {', '.join(SEARCH_KEYS)}; the other search options go in [search])"
            )
        for needed in ("scores", "keep_best"):
            if needed not in table:
                raise ConfigError(
                    f"{path}: [[pipeline.searches]] {table['name']!r} needs {needed!r}"
                    + (" (the point the study evaluates)" if needed == "keep_best" else "")
                )
        return cls(str(table["name"]), tuple((k, str(table[k])) for k in SEARCH_KEYS if k in table))


@dataclass(frozen=True)
class Plan:
    safety_data: str
    utility_data: str
    methods: tuple[str, ...]
    top_ratio: float
    pq: tuple[tuple[float, float], ...]
    set_difference_method: str
    random_control: bool = False
    baseline_models: tuple[str, ...] = ()
    rank_statistics: bool = False  # actsvd on both sets (for rank edits and their search)
    mean_activations: bool = False  # mean-activations on both sets' prompts (the direction)
    searches: tuple[SearchPlan, ...] = ()
    configs: str | None = None  # eval-attack settings of the dense model and searched points
    other_configs: str | None = None  # ... of every other row (controls, baselines, sweeps)

    @classmethod
    def from_config(cls, config: dict[str, Any], path: Path) -> Plan:
        table = config.get("pipeline")
        if not isinstance(table, dict):
            raise ConfigError(f"{path} has no [pipeline] table: it is not a pipeline config")
        known = {
            "safety_data",
            "utility_data",
            "methods",
            "top_ratio",
            "pq",
            "set_difference_method",
            "random_control",
            "baseline_models",
            "rank_statistics",
            "mean_activations",
            "searches",
            "configs",
            "other_configs",
        }
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r} in [pipeline] (keys: {', '.join(sorted(known))})"
            )
        try:
            methods = tuple(str(m) for m in table.get("methods", ["wanda", "wandg"]))
            plan = cls(
                safety_data=str(table.get("safety_data", "align_short")),
                utility_data=str(table.get("utility_data", "utility")),
                methods=methods,
                top_ratio=float(table.get("top_ratio", 0.01)),
                pq=tuple((float(p), float(q)) for p, q in table.get("pq", [[0.01, 0.01]])),
                set_difference_method=str(table.get("set_difference_method", "wandg")),
                random_control=bool(table.get("random_control", False)),
                baseline_models=tuple(str(m) for m in table.get("baseline_models", [])),
                rank_statistics=bool(table.get("rank_statistics", False)),
                mean_activations=bool(table.get("mean_activations", False)),
                searches=tuple(
                    SearchPlan.from_table(entry, path) for entry in table.get("searches", [])
                ),
                configs=str(table["configs"]) if "configs" in table else None,
                other_configs=str(table["other_configs"]) if "other_configs" in table else None,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: [pipeline] has a value of the wrong type ({exc})") from exc
        plan.check(path)
        return plan

    def check(self, path: Path) -> None:
        for method in self.methods:
            if method not in WEIGHT_METHODS:
                raise ConfigError(
                    f"{path}: [pipeline] methods has {method!r}: use {', '.join(WEIGHT_METHODS)}"
                )
        if self.pq and self.set_difference_method not in self.methods:
            raise ConfigError(f"{path}: [pipeline] set_difference_method must be one of methods")
        if not 0 <= self.top_ratio < 1:
            raise ConfigError(f"{path}: [pipeline] top_ratio must be in [0, 1) (0: no top masks)")
        for p, q in self.pq:
            if not (0 < p <= 1 and 0 < q <= 1):
                raise ConfigError(
                    f"{path}: [pipeline] pq has ({p}, {q}): p and q must be in (0, 1]"
                )
        names = [s.name for s in self.searches]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: [[pipeline.searches]] names must be distinct")
        available = set(self.score_set_names)
        for search in self.searches:
            for name in search.score_sets:
                if name not in available:
                    raise ConfigError(
                        f"{path}: [[pipeline.searches]] {search.name!r} reads {name!r}, which "
                        f"the pipeline does not score (it scores: {', '.join(sorted(available))})"
                    )

    @property
    def set_methods(self) -> list[str]:
        """The `score` methods run on both sets: weight scores, then rank statistics and mean
        activations where asked for."""
        return [
            *self.methods,
            *(["actsvd"] if self.rank_statistics else []),
            *(["mean-activations"] if self.mean_activations else []),
        ]

    @property
    def score_set_names(self) -> list[str]:
        """`<method>-safety` and `<method>-utility` per method (and actsvd's with
        rank_statistics), plus `random` for the controls."""
        names = [f"{m}-{role}" for m in self.set_methods for role in ("safety", "utility")]
        return names + (["random"] if self.random_control else [])


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def makefile(plan: Plan, config: Path, out: Path, wandacli: str, model: str | None) -> str:
    """Make rules for the whole study; targets are the files each step writes."""
    rules = _Rules(config, out, wandacli, model)
    scores = rules.score_sets(plan)
    masks = rules.masks(plan, scores)
    if plan.random_control:
        rules.random_controls(plan, masks, scores)
    searched = rules.searches(plan, scores)
    comparisons = rules.comparisons(plan, scores, searched)
    evaluations = rules.evaluations(plan, masks, searched)
    rules.report(plan, [*comparisons, *evaluations])
    return rules.text()


class _Rules:
    """The Makefile being written: one rule per file a step makes, in the order they run."""

    def __init__(self, config: Path, out: Path, wandacli: str, model: str | None) -> None:
        self.config, self.out, self.wandacli = config, out, wandacli
        self.store, self.results = out / "store", out / "results"
        self.common = f"--config {_q(config)}"
        self.model_flag = f" --model {_q(model)}" if model else ""
        self.lines = [
            f"# Generated by python -m wandacli.pipeline from {config}; do not edit.",
            f"PIPELINE_STORE := {self.store}",
            f"PIPELINE_RESULTS := {self.results}",
            "",
        ]

    def rule(self, target: Path, deps: list[Path], *commands: str) -> None:
        self.lines.append(f"{target}: {' '.join(str(d) for d in deps)} {self.config}".rstrip())
        self.lines.extend(f"\t{command}" for command in commands)
        self.lines.append("")

    def in_store(self, command: str) -> str:
        """A wandacli command on the study's store and model."""
        return f"{self.wandacli} {command} {self.common}{self.model_flag} --store {_q(self.store)}"

    def score_sets(self, plan: Plan) -> dict[str, Path]:
        """Every score set and rank-statistics set, by name."""
        scores: dict[str, Path] = {}
        for method in plan.set_methods:
            for role, data in (("safety", plan.safety_data), ("utility", plan.utility_data)):
                name = f"{method}-{role}"
                scores[name] = self.store / "scores" / f"{name}.h5"
                self.rule(
                    scores[name],
                    [],
                    f"{self.in_store('score')} --method {method} "
                    f"--data {_q(data)} --name {name} --overwrite --no-progress",
                )
        if plan.random_control:
            scores["random"] = self.store / "scores" / "random.h5"
            self.rule(
                scores["random"],
                [],
                f"{self.in_store('score')} --method random --name random --overwrite --no-progress",
            )
        return scores

    def masks(self, plan: Plan, scores: dict[str, Path]) -> dict[str, Path]:
        masks: dict[str, Path] = {}
        for method in plan.methods if plan.top_ratio > 0 else ():
            name = f"top{plan.top_ratio:g}-{method}-safety"
            masks[name] = self.store / "masks" / f"{name}.h5"
            self.rule(
                masks[name],
                [scores[f"{method}-safety"]],
                f"{self.in_store('prune')} --scores {method}-safety "
                f"--sparsity-ratio {plan.top_ratio:g} --prune-highest --name {name} --overwrite --no-progress",
            )
        sd = plan.set_difference_method
        for p, q in plan.pq:
            name = f"{sd}-setdiff-q{q:g}-p{p:g}"
            masks[name] = self.store / "masks" / f"{name}.h5"
            self.rule(
                masks[name],
                [scores[f"{sd}-safety"], scores[f"{sd}-utility"]],
                f"{self.in_store('prune')} --scores {sd}-safety "
                f"--utility-scores {sd}-utility --p {p:g} --q {q:g} --name {name} --overwrite --no-progress",
            )
        return masks

    def random_controls(self, plan: Plan, masks: dict[str, Path], scores: dict[str, Path]) -> None:
        """Per mask, the control that prunes as many weights in every matrix, chosen at random:
        what removing that many weights costs without attribution. Added to `masks`, so that
        they are evaluated beside the masks they match."""
        # The top-ratio masks of every method prune int(in × ratio) per row alike: one control.
        tops = [n for n in masks if n.startswith("top")]
        controlled = {f"top{plan.top_ratio:g}": tops[0]} if tops else {}
        controlled.update({n: n for n in masks if n not in tops})
        for label, name in controlled.items():
            control = f"random-as-{label}"
            masks[control] = self.store / "masks" / f"{control}.h5"
            self.rule(
                masks[control],
                [scores["random"], masks[name]],
                f"{self.in_store('prune')} --scores random "
                f"--match-counts {name} --name {control} --overwrite --no-progress",
            )

    def searches(self, plan: Plan, scores: dict[str, Path]) -> dict[str, Path]:
        """Per search, its `.best` point and, with random_control, a random removal of that
        point's size: a mask of the same per-matrix counts, or an edit of the same per-module
        rank in random directions. The points, by name, for the evaluations."""
        made: dict[str, Path] = {}
        for search in plan.searches:
            folder = "edits" if search.is_edit else "masks"
            best = self.store / folder / f"{search.best}.h5"
            flags = " ".join(
                f"--{key.replace('_', '-')} {_q(value)}" for key, value in search.options
            )
            self.rule(
                best,
                [scores[name] for name in search.score_sets],
                f"{self.in_store('search')} --name {_q(search.name)} {flags} --no-progress",
            )
            made[search.best] = best
            if not plan.random_control:
                continue
            control = f"random-as-{search.best}"
            made[control] = self.store / folder / f"{control}.h5"
            if search.is_edit:
                command = (
                    f"{self.in_store('prune')} --scores {_q(search.option['scores'])} "
                    f"--match-ranks {search.best} --name {control} --overwrite --no-progress"
                )
                deps = [scores[search.option["scores"]], best]
            else:
                command = (
                    f"{self.in_store('prune')} --scores random --match-counts {search.best} "
                    f"--name {control} --overwrite --no-progress"
                )
                deps = [scores["random"], best]
            self.rule(made[control], deps, command)
        return made

    def comparisons(
        self, plan: Plan, scores: dict[str, Path], searched: dict[str, Path]
    ) -> list[Path]:
        """Safety vs utility per method, the methods on safety; with mean activations the
        candidate directions' cosines across layers (a heatmap in out/figures), and with rank
        statistics too, each searched direction's share inside the safety subspaces."""
        pairs: list[tuple[str, list[Path], str]] = [
            (f"{m}-safety-vs-utility", [scores[f"{m}-safety"], scores[f"{m}-utility"]], "")
            for m in plan.methods
        ]
        if len(plan.methods) > 1:
            pairs.append(("methods-on-safety", [scores[f"{m}-safety"] for m in plan.methods], ""))
        if plan.mean_activations:
            means = [scores["mean-activations-safety"], scores["mean-activations-utility"]]
            figure = self.out / "figures" / "direction-cosines.png"
            pairs.append(("direction-cosines", means, f" --plot {figure}"))
        for search in plan.searches if plan.rank_statistics else ():
            if "direction_layer" in search.option:
                inputs = [searched[search.best], scores["actsvd-safety"]]
                pairs.append((f"{search.name}-in-safety-subspaces", inputs, self.model_flag))
        made = []
        for stem, inputs, extra in pairs:
            target = self.out / "compare" / f"{stem}.csv"
            made.append(target)
            self.rule(
                target,
                inputs,
                f"mkdir -p {self.out / 'compare'} {self.out / 'figures'}",
                f"{self.wandacli} compare {self.common}{extra} "
                f"{' '.join(str(i) for i in inputs)} --store {self.store} "
                f"--csv {target}.tmp --no-progress > {target}.txt && mv {target}.tmp {target}",
            )
        return made

    def evaluations(
        self, plan: Plan, masks: dict[str, Path], searched: dict[str, Path]
    ) -> list[Path]:
        """eval-attack and eval-utility of the dense model, every mask, edit and searched
        point, and every baseline: the dense model and the searched points in `configs`, the
        rest in `other_configs` (each defaults to the config's [eval-attack] table)."""
        made: list[Path] = []
        headline = {"dense", *(s.best for s in plan.searches)}
        removals: list[tuple[str, Path | None]] = [
            ("dense", None),
            *masks.items(),
            *searched.items(),
        ]
        runs: list[tuple[str, list[Path], str]] = [
            (
                label,
                [removal] if removal is not None else [],
                f"{self.common}{self.model_flag}"
                + (f" --mask {_q(removal)}" if removal is not None else ""),
            )
            for label, removal in removals
        ]
        runs += [
            (f"baseline-{file_safe_name(b)}", [], f"{self.common} --model {_q(b)}")
            for b in plan.baseline_models
        ]
        for label, deps, flags in runs:
            folder = self.results / label
            attack, utility = folder / "results.json", folder / "utility.json"
            made += [attack, utility]
            configs = plan.configs if label in headline else plan.other_configs
            configs_flag = f" --configs {_q(configs)}" if configs else ""
            self.rule(
                attack,
                deps,
                f"{self.wandacli} eval-attack {flags}{configs_flag} --out {folder} "
                "--overwrite --no-progress",
            )
            self.rule(
                utility, deps, f"{self.wandacli} eval-utility {flags} --out {folder} --no-progress"
            )
        return made

    def report(self, plan: Plan, inputs: list[Path]) -> None:
        table = self.out / "results.txt"
        searches = f" --searches {self.store}" if plan.searches else ""
        self.rule(
            table,
            inputs,
            f"{self.wandacli} report {self.results} --markdown {self.out / 'results.md'} "
            f"--plots {self.out / 'figures'} --compare {self.out / 'compare'}{searches} "
            f"> {table}.tmp && mv {table}.tmp {table}",
        )
        self.lines += [f"pipeline: {table}", f"\t@cat {table}", "", ".PHONY: pipeline"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (3, 4):
        print("usage: python -m wandacli.pipeline CONFIG OUT WANDACLI [MODEL]", file=sys.stderr)
        return 2
    config, out, wandacli = Path(args[0]), Path(args[1]), args[2]
    model = args[3] if len(args) == 4 and args[3] else None
    try:
        plan = Plan.from_config(read_config_file(config), config)
    except WandacliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(makefile(plan, config, out, wandacli, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
