"""The study as Make rules: `python -m wandacli.pipeline CONFIG OUT` prints a makefile whose
targets are the files each step writes, so `make demo` (or `make paper`) re-runs only what is
missing. The plan comes from the config's `[pipeline]` table; every command also reads the
same config for its options.

    score    wanda and wandg (the `methods`) on the safety and the utility set
    prune    the top `top_ratio` of safety scores per row (`--prune-highest`), per method;
             the set difference for every (p, q) in `pq`, from `set_difference_method`;
             with `random_control`, a random mask of the same per-matrix counts beside each
    compare  safety vs utility per method, and the methods against each other on safety
    eval     eval-attack and eval-utility on the dense model and every mask, and on each
             of `baseline_models` (e.g. the model before alignment), dense
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
        }
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r} in [pipeline] (keys: {', '.join(sorted(known))})"
            )
        try:
            plan = cls(
                safety_data=str(table.get("safety_data", "align_short")),
                utility_data=str(table.get("utility_data", "utility")),
                methods=tuple(str(m) for m in table.get("methods", ["wanda", "wandg"])),
                top_ratio=float(table.get("top_ratio", 0.01)),
                pq=tuple((float(p), float(q)) for p, q in table.get("pq", [[0.01, 0.01]])),
                set_difference_method=str(table.get("set_difference_method", "wandg")),
                random_control=bool(table.get("random_control", False)),
                baseline_models=tuple(str(m) for m in table.get("baseline_models", [])),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: [pipeline] has a value of the wrong type ({exc})") from exc
        for method in plan.methods:
            if method not in WEIGHT_METHODS:
                raise ConfigError(
                    f"{path}: [pipeline] methods has {method!r}: use {', '.join(WEIGHT_METHODS)}"
                )
        if plan.set_difference_method not in plan.methods:
            raise ConfigError(f"{path}: [pipeline] set_difference_method must be one of methods")
        if not 0 < plan.top_ratio < 1:
            raise ConfigError(f"{path}: [pipeline] top_ratio must be in (0, 1)")
        for p, q in plan.pq:
            if not (0 < p <= 1 and 0 < q <= 1):
                raise ConfigError(
                    f"{path}: [pipeline] pq has ({p}, {q}): p and q must be in (0, 1]"
                )
        return plan


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def makefile(plan: Plan, config: Path, out: Path, wandacli: str, model: str | None) -> str:
    """Make rules for the whole study; targets are the files each step writes."""
    rules = _Rules(config, out, wandacli, model)
    scores = rules.score_sets(plan)
    masks = rules.masks(plan, scores)
    if plan.random_control:
        rules.random_controls(plan, masks)
    comparisons = rules.comparisons(plan, scores)
    evaluations = rules.evaluations(plan, masks)
    rules.report([*comparisons, *evaluations])
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

    def score_sets(self, plan: Plan) -> dict[tuple[str, str], Path]:
        scores: dict[tuple[str, str], Path] = {}
        for method in plan.methods:
            for role, data in (("safety", plan.safety_data), ("utility", plan.utility_data)):
                target = self.store / "scores" / f"{method}-{role}.h5"
                scores[(method, role)] = target
                self.rule(
                    target,
                    [],
                    f"{self.in_store('score')} --method {method} "
                    f"--data {_q(data)} --name {method}-{role} --overwrite --no-progress",
                )
        return scores

    def masks(self, plan: Plan, scores: dict[tuple[str, str], Path]) -> dict[str, Path]:
        masks: dict[str, Path] = {}
        for method in plan.methods:
            name = f"top{plan.top_ratio:g}-{method}-safety"
            masks[name] = self.store / "masks" / f"{name}.h5"
            self.rule(
                masks[name],
                [scores[(method, "safety")]],
                f"{self.in_store('prune')} --scores {method}-safety "
                f"--sparsity-ratio {plan.top_ratio:g} --prune-highest --name {name} --overwrite --no-progress",
            )
        sd = plan.set_difference_method
        for p, q in plan.pq:
            name = f"{sd}-setdiff-q{q:g}-p{p:g}"
            masks[name] = self.store / "masks" / f"{name}.h5"
            self.rule(
                masks[name],
                [scores[(sd, "safety")], scores[(sd, "utility")]],
                f"{self.in_store('prune')} --scores {sd}-safety "
                f"--utility-scores {sd}-utility --p {p:g} --q {q:g} --name {name} --overwrite --no-progress",
            )
        return masks

    def random_controls(self, plan: Plan, masks: dict[str, Path]) -> None:
        """One random score set; per mask, the control that prunes as many weights in every
        matrix, chosen at random: what removing that many weights costs without attribution.
        Added to `masks`, so that they are evaluated beside the masks they match."""
        random_scores = self.store / "scores" / "random.h5"
        self.rule(
            random_scores,
            [],
            f"{self.in_store('score')} --method random --name random --overwrite --no-progress",
        )
        # The top-ratio masks of every method prune int(in × ratio) per row alike: one control.
        tops = [n for n in masks if n.startswith("top")]
        controlled = {f"top{plan.top_ratio:g}": tops[0]} if tops else {}
        controlled.update({n: n for n in masks if n not in tops})
        for label, name in controlled.items():
            control = f"random-as-{label}"
            masks[control] = self.store / "masks" / f"{control}.h5"
            self.rule(
                masks[control],
                [random_scores, masks[name]],
                f"{self.in_store('prune')} --scores random "
                f"--match-counts {name} --name {control} --overwrite --no-progress",
            )

    def comparisons(self, plan: Plan, scores: dict[tuple[str, str], Path]) -> list[Path]:
        pairs = [
            (f"{m}-safety-vs-utility", [scores[(m, "safety")], scores[(m, "utility")]])
            for m in plan.methods
        ]
        if len(plan.methods) > 1:
            pairs.append(("methods-on-safety", [scores[(m, "safety")] for m in plan.methods]))
        made = []
        for stem, inputs in pairs:
            target = self.out / "compare" / f"{stem}.csv"
            made.append(target)
            self.rule(
                target,
                inputs,
                f"mkdir -p {self.out / 'compare'}",
                f"{self.wandacli} compare {self.common} {' '.join(str(i) for i in inputs)} "
                f"--csv {target}.tmp --no-progress > {target}.txt && mv {target}.tmp {target}",
            )
        return made

    def evaluations(self, plan: Plan, masks: dict[str, Path]) -> list[Path]:
        """eval-attack and eval-utility of the dense model, every mask and every baseline."""
        made: list[Path] = []
        runs: list[tuple[str, list[Path], str]] = [
            (
                label,
                [mask] if mask is not None else [],
                f"{self.common}{self.model_flag}"
                + (f" --mask {_q(mask)}" if mask is not None else ""),
            )
            for label, mask in [("dense", None), *masks.items()]
        ]
        runs += [
            (f"baseline-{file_safe_name(b)}", [], f"{self.common} --model {_q(b)}")
            for b in plan.baseline_models
        ]
        for label, deps, flags in runs:
            folder = self.results / label
            attack, utility = folder / "results.json", folder / "utility.json"
            made += [attack, utility]
            self.rule(
                attack,
                deps,
                f"{self.wandacli} eval-attack {flags} --out {folder} --overwrite --no-progress",
            )
            self.rule(
                utility, deps, f"{self.wandacli} eval-utility {flags} --out {folder} --no-progress"
            )
        return made

    def report(self, inputs: list[Path]) -> None:
        table = self.out / "results.txt"
        self.rule(
            table,
            inputs,
            f"{self.wandacli} report {self.results} --markdown {self.out / 'results.md'} "
            f"--plots {self.out / 'figures'} --compare {self.out / 'compare'} "
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
