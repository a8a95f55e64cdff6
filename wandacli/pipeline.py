"""The study as Make rules: `wandacli pipeline CONFIG --out OUT` prints a makefile whose
targets are the files each step writes, so `make demo` (or `make paper`) re-runs only what is
missing. The plan comes from the config's `[pipeline]` table; every command also reads the
same config for its options, and every flag a rule writes is the flag its option declares
(a renamed option is renamed here, or fails when the rules are made, not when make runs them).

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
    attack   with [pipeline.attack], `finetune` five ways (full, the mask frozen, rewound, its
             random control frozen, and transplanted back into the full attack), the models
             after the [finetune] table's save-steps beside each
    eval     eval-attack and eval-utility on the dense model and every mask and edit, and on
             each of `baseline_models` (e.g. the model before alignment), dense: the dense
             model and the searched points in `configs`, the rest in `other_configs`, the
             attacked models in the attack's `configs`
    report   one results table, the study's figures (out/figures) and out/results.md
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from wandacli.config.compare import CompareConfig
from wandacli.config.declare import declared_fields, flag_of, option
from wandacli.config.evaluation import AttackConfig, UtilityConfig
from wandacli.config.outputs import ReportConfig
from wandacli.config.score import ScoreConfig
from wandacli.config.settings import WEIGHT_METHODS, CommandOptions
from wandacli.core.errors import ConfigError
from wandacli.core.naming import file_safe_name
from wandacli.removal.kinds import searchable
from wandacli.removal.request import prune_flag
from wandacli.search.config import best_name, search_flag, search_parameters
from wandacli.store.schema import Store
from wandacli.store.summaries import ATTACK_RESULTS, UTILITY_RESULTS

# The `search` options a [[pipeline.searches]] entry may set beside its ranges (the rest come
# from [search]).
ENTRY_OPTIONS = (
    "scores",
    "utility_scores",
    "layers",
    "modules",
    "include_routers",
    "trials",
    "startup_trials",
    "sampler",
    "keep_best",
    "seed",
)


def entry_keys() -> tuple[str, ...]:
    """Every key an entry may have: its options, then every searchable range."""
    return (*ENTRY_OPTIONS[:2], *search_parameters(), *ENTRY_OPTIONS[2:])


def control_name(name: str) -> str:
    """The random control of the mask or edit `name`, as the study names it."""
    return f"random-as-{name}"


def _q(value: Any) -> str:
    return shlex.quote(str(value))


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
        """Whether its kind (the one its ranges ask for) makes edits."""
        parameters = search_parameters()
        names = {parameters[key].name for key in self.option if key in parameters}
        return any(kind.family == "edit" for kind in searchable() if kind.accepts(names))

    @property
    def best(self) -> str:
        return best_name(self.name)

    @property
    def score_sets(self) -> list[str]:
        return [self.option[k] for k in ("scores", "utility_scores") if k in self.option]

    @property
    def reads_directions(self) -> bool:
        return "direction_layer" in self.option

    @classmethod
    def from_table(cls, table: Any, path: Path) -> SearchPlan:
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise ConfigError(f"{path}: every [[pipeline.searches]] entry needs a name")
        keys = entry_keys()
        unknown = sorted(set(table) - {"name", *keys})
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r} in [[pipeline.searches]] {table['name']!r} "
                f"(keys: name, {', '.join(keys)}; the other search options go in [search])"
            )
        for needed in ("scores", "keep_best"):
            if needed not in table:
                raise ConfigError(
                    f"{path}: [[pipeline.searches]] {table['name']!r} needs {needed!r}"
                    + (" (the point the study evaluates)" if needed == "keep_best" else "")
                )
        return cls(str(table["name"]), tuple((k, str(table[k])) for k in keys if k in table))


@dataclass(frozen=True)
class AttackPlan:
    """`[pipeline.attack]`: the paper's fine-tuning attack on the study's model, five ways,
    with `mask` (a searched point or a mask the study makes) as the attributed weights: fully
    fine-tuned; with them frozen; with them rewound; with its random control frozen (with
    random_control); and the fully attacked model with them transplanted back from the aligned
    one. The attack's own options (its data, steps, --save-steps, ...) are the config's
    [finetune] table, which every `finetune` the rules run reads."""

    mask: str
    configs: str | None = None  # eval-attack settings of the attacked models [the headline's]
    save_steps: tuple[int, ...] = ()  # the config's [finetune] save-steps: the figure's points
    aligned_model: str | None = None  # the config's `model`: the transplant copies from it

    @classmethod
    def from_table(cls, table: Any, config: dict[str, Any], path: Path) -> AttackPlan:
        from wandacli.config.finetune import FinetuneConfig

        if not isinstance(table, dict) or not isinstance(table.get("mask"), str):
            raise ConfigError(f'{path}: [pipeline.attack] needs mask = "<a mask\'s name>"')
        unknown = sorted(set(table) - {"mask", "configs"})
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r} in [pipeline.attack] (its keys: mask, "
                "configs; the attack's options go in [finetune])"
            )
        # The attack's steps as `finetune` reads them from the config's [finetune] table.
        declared = next(f for f in declared_fields(FinetuneConfig) if f.name == "save_steps")
        raw = (config.get("finetune") or {}).get(declared.declared.flag.removeprefix("--"))
        save_steps = (
            declared.declared.parse(raw) if raw is not None and declared.declared.parse else ()
        )
        configs, model = table.get("configs"), config.get("model")
        return cls(
            str(table["mask"]),
            str(configs) if configs else None,
            tuple(save_steps),
            str(model) if model else None,
        )

    def runs(self, random_control: bool) -> list[tuple[str, str | None, str | None]]:
        """(row, --freeze/--rewind/--transplant, the mask) of each attack, in the order they
        run (the transplant reads the full attack's model)."""
        runs: list[tuple[str, str | None, str | None]] = [
            ("full", None, None),
            ("freeze", "freeze", self.mask),
            ("rewind", "rewind", self.mask),
        ]
        if random_control:
            runs.append(("random-freeze", "freeze", control_name(self.mask)))
        runs.append(("transplant", "transplant", self.mask))
        return runs


@dataclass(frozen=True)
class Plan:
    """The `[pipeline]` table: what the study scores, prunes, searches and evaluates. Each
    key's default is its field's."""

    safety_data: str = "align_short"
    utility_data: str = "utility"
    methods: tuple[str, ...] = ("wanda", "wandg")
    top_ratio: float = 0.01
    pq: tuple[tuple[float, float], ...] = ((0.01, 0.01),)
    set_difference_method: str = "wandg"
    random_control: bool = False
    baseline_models: tuple[str, ...] = ()
    rank_statistics: bool = False  # actsvd on both sets (for rank edits and their search)
    mean_activations: bool = False  # mean-activations on both sets' prompts (the direction)
    searches: tuple[SearchPlan, ...] = ()
    attack: AttackPlan | None = None  # the fine-tuning attack, five ways
    configs: str | None = None  # eval-attack settings of the dense model and searched points
    other_configs: str | None = None  # ... of every other row (controls, baselines, sweeps)

    @classmethod
    def from_config(cls, config: dict[str, Any], path: Path) -> Plan:
        table = config.get("pipeline")
        if not isinstance(table, dict):
            raise ConfigError(f"{path} has no [pipeline] table: it is not a pipeline config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r} in [pipeline] (keys: {', '.join(sorted(known))})"
            )
        parse: dict[str, Any] = {
            "methods": lambda v: tuple(str(m) for m in v),
            "top_ratio": float,
            "pq": lambda v: tuple((float(p), float(q)) for p, q in v),
            "random_control": bool,
            "baseline_models": lambda v: tuple(str(m) for m in v),
            "rank_statistics": bool,
            "mean_activations": bool,
            "searches": lambda v: tuple(SearchPlan.from_table(entry, path) for entry in v),
            "attack": lambda v: AttackPlan.from_table(v, config, path),
        }
        try:
            values = {key: parse.get(key, str)(value) for key, value in table.items()}
            plan = cls(**values)
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


def makefile(plan: Plan, config: Path, out: Path, wandacli: str, model: str | None) -> str:
    """Make rules for the whole study; targets are the files each step writes. `model`
    overrides the config's in every rule."""
    rules = _Rules(config, out, wandacli, model)
    scores = rules.score_sets(plan)
    masks = rules.masks(plan, scores)
    if plan.random_control:
        rules.random_controls(plan, masks, scores)
    searched = rules.searches(plan, scores)
    attacked = rules.attacks(plan, masks, searched) if plan.attack else []
    comparisons = rules.comparisons(plan, scores, searched)
    evaluations = rules.evaluations(plan, masks, searched, attacked)
    rules.report(plan, [*comparisons, *evaluations])
    return rules.text()


# Flags as the options declare them, by command.
def _score(name: str) -> str:
    return flag_of(ScoreConfig, name)


def _common(name: str) -> str:
    return flag_of(CommandOptions, name)


class _Rules:
    """The Makefile being written: one rule per file a step makes, in the order they run."""

    def __init__(self, config: Path, out: Path, wandacli: str, model: str | None) -> None:
        self.config, self.out, self.wandacli = config, out, wandacli
        self.store, self.results = out / "store", out / "results"
        self.paths = Store(self.store)  # the store's own file names
        self.common = f"{_common('config')} {_q(config)}"
        self.model = model
        self.model_flag = f" {_score('model')} {_q(model)}" if model else ""
        self.quiet = _common("no_progress")
        self.lines = [
            f"# Generated by `wandacli pipeline` from {config}; do not edit.",
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
        return (
            f"{self.wandacli} {command} {self.common}{self.model_flag} "
            f"{_score('store')} {_q(self.store)}"
        )

    def prune(self, scores: str, name: str, **options: Any) -> str:
        """`prune` of `scores` into `name`, its other options by field name (True: a switch)."""
        flags = " ".join(
            prune_flag(key) if value is True else f"{prune_flag(key)} {value}"
            for key, value in options.items()
        )
        return (
            f"{self.in_store('prune')} {prune_flag('scores')} {scores} {flags} "
            f"{prune_flag('name')} {name} {prune_flag('overwrite')} {self.quiet}"
        )

    def score_sets(self, plan: Plan) -> dict[str, Path]:
        """Every score set and rank-statistics set, by name."""
        scores: dict[str, Path] = {}
        finish = f"{_score('overwrite')} {self.quiet}"
        for method in plan.set_methods:
            for role, data in (("safety", plan.safety_data), ("utility", plan.utility_data)):
                name = f"{method}-{role}"
                scores[name] = self.paths.score_set_path(name)
                self.rule(
                    scores[name],
                    [],
                    f"{self.in_store('score')} {_score('method')} {method} "
                    f"{_score('data')} {_q(data)} {_score('name')} {name} {finish}",
                )
        if plan.random_control:
            scores["random"] = self.paths.score_set_path("random")
            self.rule(
                scores["random"],
                [],
                f"{self.in_store('score')} {_score('method')} random {_score('name')} random {finish}",
            )
        return scores

    def masks(self, plan: Plan, scores: dict[str, Path]) -> dict[str, Path]:
        masks: dict[str, Path] = {}
        for method in plan.methods if plan.top_ratio > 0 else ():
            name = f"top{plan.top_ratio:g}-{method}-safety"
            masks[name] = self.paths.mask_path(name)
            command = self.prune(
                f"{method}-safety", name, sparsity_ratio=f"{plan.top_ratio:g}", prune_highest=True
            )
            self.rule(masks[name], [scores[f"{method}-safety"]], command)
        sd = plan.set_difference_method
        for p, q in plan.pq:
            name = f"{sd}-setdiff-q{q:g}-p{p:g}"
            masks[name] = self.paths.mask_path(name)
            command = self.prune(
                f"{sd}-safety", name, utility_scores=f"{sd}-utility", p=f"{p:g}", q=f"{q:g}"
            )
            self.rule(masks[name], [scores[f"{sd}-safety"], scores[f"{sd}-utility"]], command)
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
            control = control_name(label)
            masks[control] = self.paths.mask_path(control)
            command = self.prune("random", control, match_counts=name)
            self.rule(masks[control], [scores["random"], masks[name]], command)

    def searches(self, plan: Plan, scores: dict[str, Path]) -> dict[str, Path]:
        """Per search, its `.best` point and, with random_control, a random removal of that
        point's size: a mask of the same per-matrix counts, or an edit of the same per-module
        rank in random directions. The points, by name, for the evaluations."""
        made: dict[str, Path] = {}
        for search in plan.searches:
            path_of = self.paths.edit_path if search.is_edit else self.paths.mask_path
            best = path_of(search.best)
            flags = " ".join(f"{search_flag(key)} {_q(value)}" for key, value in search.options)
            self.rule(
                best,
                [scores[name] for name in search.score_sets],
                f"{self.in_store('search')} {search_flag('name')} {_q(search.name)} {flags} "
                f"{self.quiet}",
            )
            made[search.best] = best
            if not plan.random_control:
                continue
            control = control_name(search.best)
            made[control] = path_of(control)
            if search.is_edit:
                model_set = search.option["scores"]
                command = self.prune(_q(model_set), control, match_ranks=search.best)
                deps = [scores[model_set], best]
            else:
                command = self.prune("random", control, match_counts=search.best)
                deps = [scores["random"], best]
            self.rule(made[control], deps, command)
        return made

    def attacks(
        self, plan: Plan, masks: dict[str, Path], searched: dict[str, Path]
    ) -> list[tuple[str, Path]]:
        """`finetune` five ways (AttackPlan), each model saved under out/finetune/, and the
        models after each of --save-steps beside it: (results label, model folder) of each."""
        from wandacli.config.finetune import FinetuneConfig
        from wandacli.training.finetune import RECORD_NAME

        assert plan.attack is not None
        removals = {**masks, **searched}
        for name in (plan.attack.mask, control_name(plan.attack.mask)):
            if name == plan.attack.mask or plan.random_control:
                path = removals.get(name)
                if path is None or path.parent.name != "masks":
                    made = ", ".join(n for n, p in removals.items() if p.parent.name == "masks")
                    raise ConfigError(
                        f"{self.config}: [pipeline.attack] mask {name!r} is not a mask the "
                        f"study makes (its masks: {made or 'none'})"
                    )

        def flag(name: str) -> str:
            return flag_of(FinetuneConfig, name)

        folder = self.out / "finetune"
        models: list[tuple[str, Path]] = []
        full = folder / "full"
        for row, mode, mask in plan.attack.runs(plan.random_control):
            out = folder / row
            deps = [removals[mask]] if mask else []
            extra = ""
            if mode == "transplant":
                aligned = self.model or plan.attack.aligned_model
                if aligned is None:
                    raise ConfigError(
                        f"{self.config}: the transplant copies from the study's model: set "
                        "model in the config, or pass --model"
                    )
                extra = f" {flag('model')} {_q(full)} {flag('from_model')} {_q(aligned)}"
                deps.append(full / RECORD_NAME)
            elif self.model:
                extra = f" {flag('model')} {_q(self.model)}"
            if mode is not None:
                extra += f" {flag(mode)} {_q(mask)} {flag('store')} {_q(self.store)}"
            self.rule(
                out / RECORD_NAME,
                deps,
                f"{self.wandacli} finetune {self.common}{extra} {flag('out')} {_q(out)} "
                f"{flag('overwrite')} {self.quiet}",
            )
            models.append((f"finetune-{row}", out))
            if mode == "transplant":
                continue
            for step in plan.attack.save_steps:
                saved = folder / f"{row}-step{step}"
                # Written by the attack's own rule, before the attack's own record: no command
                # of its own, and after the attack by order only (a timestamp would call it
                # stale and evaluate it again on every run).
                self.lines += [f"{saved / RECORD_NAME}: | {out / RECORD_NAME} ;", ""]
                models.append((f"finetune-{row}-step{step}", saved))
        return models

    def comparisons(
        self, plan: Plan, scores: dict[str, Path], searched: dict[str, Path]
    ) -> list[Path]:
        """Safety vs utility per method, the methods on safety; with mean activations the
        candidate directions' cosines across layers (a heatmap in out/figures), and with rank
        statistics too, each searched direction's share inside the safety subspaces."""
        plot = flag_of(CompareConfig, "plot")
        pairs: list[tuple[str, list[Path], str]] = [
            (f"{m}-safety-vs-utility", [scores[f"{m}-safety"], scores[f"{m}-utility"]], "")
            for m in plan.methods
        ]
        if len(plan.methods) > 1:
            pairs.append(("methods-on-safety", [scores[f"{m}-safety"] for m in plan.methods], ""))
        if plan.mean_activations:
            means = [scores["mean-activations-safety"], scores["mean-activations-utility"]]
            figure = self.out / "figures" / "direction-cosines.png"
            pairs.append(("direction-cosines", means, f" {plot} {figure}"))
        for search in plan.searches if plan.rank_statistics else ():
            if search.reads_directions:
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
                f"{' '.join(str(i) for i in inputs)} {flag_of(CompareConfig, 'store')} "
                f"{self.store} {flag_of(CompareConfig, 'csv_file')} {target}.tmp {self.quiet} "
                f"> {target}.txt && mv {target}.tmp {target}",
            )
        return made

    def evaluations(
        self,
        plan: Plan,
        masks: dict[str, Path],
        searched: dict[str, Path],
        attacked: list[tuple[str, Path]],
    ) -> list[Path]:
        """eval-attack and eval-utility of the dense model, every mask, edit and searched
        point, and every baseline: the dense model and the searched points in `configs`, the
        rest in `other_configs` (each defaults to the config's [eval-attack] table)."""
        made: list[Path] = []
        headline = {"dense", *(s.best for s in plan.searches)}
        removal = flag_of(AttackConfig, "removal")
        removals: list[tuple[str, Path | None]] = [
            ("dense", None),
            *masks.items(),
            *searched.items(),
        ]
        runs: list[tuple[str, list[Path], str]] = [
            (
                label,
                [path] if path is not None else [],
                f"{self.common}{self.model_flag}"
                + (f" {removal} {_q(path)}" if path is not None else ""),
            )
            for label, path in removals
        ]
        runs += [
            (f"baseline-{file_safe_name(b)}", [], f"{self.common} {_score('model')} {_q(b)}")
            for b in plan.baseline_models
        ]
        # The attacked models and their saved steps, in the attack's settings (else the
        # headline's): the figure against steps.
        from wandacli.training.finetune import RECORD_NAME

        runs += [
            (label, [model / RECORD_NAME], f"{self.common} {_score('model')} {_q(model)}")
            for label, model in attacked
        ]
        attacked_labels = {label for label, _ in attacked}
        attack_configs = (plan.attack.configs if plan.attack else None) or plan.configs
        for label, deps, flags in runs:
            folder = self.results / label
            attack, utility = folder / ATTACK_RESULTS, folder / UTILITY_RESULTS
            made += [attack, utility]
            configs = plan.configs if label in headline else plan.other_configs
            if label in attacked_labels:
                configs = attack_configs
            configs_flag = f" {flag_of(AttackConfig, 'configs')} {_q(configs)}" if configs else ""
            self.rule(
                attack,
                deps,
                f"{self.wandacli} eval-attack {flags}{configs_flag} "
                f"{flag_of(AttackConfig, 'out')} {folder} {flag_of(AttackConfig, 'overwrite')} "
                f"{self.quiet}",
            )
            self.rule(
                utility,
                deps,
                f"{self.wandacli} eval-utility {flags} {flag_of(UtilityConfig, 'out')} {folder} "
                f"{self.quiet}",
            )
        return made

    def report(self, plan: Plan, inputs: list[Path]) -> None:
        table = self.out / "results.txt"
        searches = f" {flag_of(ReportConfig, 'searches')} {self.store}" if plan.searches else ""
        self.rule(
            table,
            inputs,
            f"{self.wandacli} report {self.results} "
            f"{flag_of(ReportConfig, 'markdown_file')} {self.out / 'results.md'} "
            f"{flag_of(ReportConfig, 'plots')} {self.out / 'figures'} "
            f"{flag_of(ReportConfig, 'compare_dir')} {self.out / 'compare'}{searches} "
            f"> {table}.tmp && mv {table}.tmp {table}",
        )
        self.lines += [f"pipeline: {table}", f"\t@cat {table}", "", ".PHONY: pipeline"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True)
class PipelineRequest:
    """`wandacli pipeline`: which config, where the study goes, how its rules call wandacli."""

    config: Path = option(
        MISSING,
        "config",
        metavar="CONFIG",
        help="A TOML config with a [pipeline] table (configs/smollm2-demo.toml).",
        argument=True,
    )
    out: Path = option(
        MISSING,
        "--out",
        "-o",
        help="The study's folder: store/, results/, compare/, figures/ and results.txt.",
        required="--out is required: the folder the study's files go to",
    )
    model: str | None = option(
        None, "--model", "-m", help="The model every step runs on [default: the config's]."
    )
    wandacli: str = option(
        "wandacli", "--wandacli", help="How the rules call wandacli (a path to its script)."
    )


def pipeline_rules(request: PipelineRequest) -> str:
    """The Make rules of the study `request.config` describes."""
    from wandacli.config.files import read_config_file

    plan = Plan.from_config(read_config_file(request.config), request.config)
    return makefile(plan, request.config, request.out, request.wandacli, request.model or None)
