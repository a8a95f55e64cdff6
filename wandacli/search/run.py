"""`wandacli search`: the operating point of a removal, searched from the stored sets.

Per trial: the removal built in memory from the store and applied to the loaded model, two
objectives measured (how much it still refuses on the search prompts, and the KL cost on
harmless prompts), the weights restored. The study lives in STORE/searches/<name>/ and resumes
where it stopped; `--keep N` writes front points into the store as ordinary masks or edits.
Its summary (search.json, store/summaries.py) is what `report` and the figures read.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.core.console import NullReporter, Reporter, info, warn
from wandacli.core.errors import StoreError, interruptible
from wandacli.core.provenance import now_iso, settings_differences, software_versions
from wandacli.evaluation.divergence import KL_RULE
from wandacli.evaluation.keyword_rule import KEYWORD_RULE
from wandacli.evaluation.prompts import (
    PromptSet,
    check_no_overlap,
    held_out_prompts,
    prompt_digests,
    read_prompts,
)
from wandacli.removal.in_memory import WeightChanges
from wandacli.search import study as studies
from wandacli.search.config import SearchConfig, best_name
from wandacli.search.objectives import (
    DOMINATED_RULE,
    Objectives,
    dominated_from,
    limit_excess,
    sampler_rule,
    sampler_values,
    skips_dominated,
)
from wandacli.search.removals import TrialRemovals, amount_name, prune_config_for
from wandacli.store.files import store_root_for
from wandacli.store.lock import writer_lock
from wandacli.store.schema import SEARCH_SUMMARY, Store, check_name
from wandacli.store.summaries import SearchSummary

FIGURE_STEM = "front"


@dataclass
class SearchResult:
    """What a search reports: its summary as it now stands, and what this run did."""

    summary: SearchSummary
    directory: Path
    kept: list[str] = field(default_factory=list)  # written by this run
    seconds: float = 0.0
    trials_asked: int = 0
    trials_run: int = 0  # in this invocation
    figure: Path | None = None  # the front, drawn by the command from the summary

    @property
    def name(self) -> str:
        return self.summary.name

    @property
    def request(self) -> dict[str, Any]:
        return self.summary.request

    @property
    def dense(self) -> dict[str, Any]:
        return self.summary.dense or {}

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.summary.trials

    @property
    def front(self) -> list[dict[str, Any]]:
        return self.summary.front

    @property
    def control(self) -> dict[str, Any] | None:
        return self.summary.control

    @property
    def best(self) -> dict[str, Any] | None:
        return self.summary.best

    @property
    def selection(self) -> dict[str, Any] | None:
        return self.summary.selection

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "directory": str(self.directory),
            "kind": self.request.get("kind"),
            "trials_asked": self.trials_asked,
            "trials_run": self.trials_run,
            "dense": self.dense,
            "trials": self.trials,
            "front": self.front,
            "control": self.control,
            "kept": self.kept,
            "best": self.best,
            "selection": self.selection,
            "figure": str(self.figure) if self.figure else None,
            "seconds": round(self.seconds, 3),
        }


class SearchRun:
    """One `wandacli search` invocation."""

    def __init__(
        self,
        config: SearchConfig,
        *,
        reporter: Reporter | None = None,
        command_line: list[str] | None = None,
    ) -> None:
        self.config = config
        self.reporter = reporter or NullReporter()
        self.command_line = command_line if command_line is not None else sys.argv

    def run(self) -> SearchResult:
        config = self.config
        started = time.monotonic()
        check_name(config.name, "search")
        root = store_root_for(config.scores, config.store)
        directory = Store(root).search_dir(config.name)
        summary_path = directory / SEARCH_SUMMARY
        previous = SearchSummary.read(summary_path) if summary_path.is_file() else None
        if previous is not None:
            self._check_same_request(previous, root)
        # Everything that can be refused is refused before the model loads or a file is made.
        search_prompts = read_prompts(
            config.prompts,
            column=config.prompt_column,
            limit=config.limit,
            offset=config.prompt_offset,
            data_dir=config.data_dir,
        )
        check_no_overlap(
            search_prompts,
            held_out_prompts(config.held_out, config.data_dir),
            "search on other prompts (e.g. --prompts advbench --offset 100)",
        )
        kl_prompts = read_prompts(
            config.kl_settings.kl_prompts,
            limit=config.kl_settings.kl_limit,
            data_dir=config.data_dir,
            option="--kl-prompts",
        )
        removals = TrialRemovals(config, root)
        try:
            with writer_lock(root, f"searches/{config.name}"):
                directory.mkdir(parents=True, exist_ok=True)
                summary = previous or SearchSummary(config.name)
                return self._search(
                    removals, directory, summary, search_prompts, kl_prompts, started
                )
        finally:
            removals.close()

    # -- the search ----------------------------------------------------------------------

    def _search(
        self,
        removals: TrialRemovals,
        directory: Path,
        summary: SearchSummary,
        search_prompts: PromptSet,
        kl_prompts: PromptSet,
        started: float,
    ) -> SearchResult:
        from wandacli.models.loader import load_model

        config = self.config
        loaded = load_model(config.model)
        removals.prepare(loaded, self.reporter)
        objectives = Objectives(
            config,
            loaded,
            search_prompts,
            kl_prompts,
            directory,
            self.reporter,
            record_streams=removals.may_leave_lower_layers(),
        )
        self._record(summary, search_prompts, kl_prompts, objectives, loaded)
        if summary.dense is None:
            summary.dense = objectives.measure() | {amount_name(config): 0.0}
        summary_path = directory / SEARCH_SUMMARY
        if config.select == "reference":
            from wandacli.search.select import run_selection

            best = run_selection(self, removals, loaded, objectives, summary, summary_path)
            return SearchResult(
                summary, directory, kept=[best["name"]] if best else [],
                seconds=time.monotonic() - started,
            )  # fmt: skip
        # The request is on disk before the journal exists: a rerun with other settings is
        # refused even when this process is killed before its first trial ends.
        _write_summary(summary_path, summary)
        ran = self._trials(removals, loaded, objectives, summary, summary_path, directory)
        summary.trials = studies.trial_records(
            studies.open_study(directory, studies.told_objectives(config))
        )
        summary.front = _front(summary.trials, config)
        if config.refusal == "score" and summary.front:
            self._count_front(summary, summary_path, removals, loaded, objectives)
        if config.control and summary.front:
            summary.control = self._control(
                summary.control, summary.front, removals, loaded, objectives
            )
        kept = self._keep(summary.front, directory, summary)
        best = self._keep_best(summary.front, directory, summary)
        if best is not None:
            summary.best = best
            kept.append(best["name"])
        summary.kept = sorted(set(summary.kept) | set(kept))
        summary.other["updated"] = now_iso()
        _write_summary(summary_path, summary)
        return SearchResult(
            summary,
            directory,
            kept=kept,
            seconds=time.monotonic() - started,
            trials_asked=config.trials,
            trials_run=ran,
        )

    def _record(
        self,
        summary: SearchSummary,
        search_prompts: PromptSet,
        kl_prompts: PromptSet,
        objectives: Objectives,
        loaded: Any,
    ) -> None:
        """What the summary says of this search: its request and settings, its prompts and
        objectives, the model, how it was asked for."""
        config = self.config
        summary.request = config.request()
        summary.trials_asked = max(config.trials, summary.trials_asked)
        summary.prompts = search_prompts.describe() | {
            "offset": config.prompt_offset,
            "text_sha256": prompt_digests(search_prompts.texts),
        }
        summary.objectives = {
            "refusal": _refusal_rule(config),
            **({"counted_refusal": _rate_rule(config)} if config.refusal == "score" else {}),
            "kl": KL_RULE + f" (k = {config.kl_settings.kl_positions})",
            **({"sampler": told} if (told := _sampler_rule(config)) else {}),
            **({"dominated": DOMINATED_RULE} if skips_dominated(config) else {}),
        }
        summary.other.update(
            {
                "config": config.to_json(),
                "kl_prompts": kl_prompts.describe(),
                "template": objectives.template,
                "model": {"id": loaded.model_id, "fingerprint": loaded.fingerprint.digest},
                "command_line": shlex.join(self.command_line),
                "versions": software_versions(),
            }
        )

    def _trials(
        self,
        removals: TrialRemovals,
        loaded: Any,
        objectives: Objectives,
        summary: SearchSummary,
        summary_path: Path,
        directory: Path,
    ) -> int:
        """Trials until `--trials` are finished (measured, or stopped as dominated by the dense
        model), each written as soon as it is measured; how many this run measured or took
        from an earlier identical trial."""
        config = self.config
        study = studies.open_study(directory, studies.told_objectives(config))
        ran = 0
        kept_message = f"completed trials are kept in {directory}; the same command resumes"
        cells = studies.grid_cells(config.searched(), config.trials, config.seed)
        dominated = dominated_from(config, summary.dense)
        if dominated is not None and config.refusal == "generation" and dominated <= 0:
            warn(
                "the dense model refuses none of the search prompts, so it dominates every "
                "trial (its KL is 0): no trial's KL is measured and the front stays empty; "
                "give --measure-dominated to measure each trial's KL anyway"
            )
        with interruptible(lambda: kept_message):
            while len(studies.finished_trials(study)) < config.trials:
                completed = len(studies.finished_trials(study))
                # A trial's time includes its proposal (a GP's is seconds), as heretic's does.
                trial_started = time.monotonic()
                study.sampler = studies.sampler_for(config, completed)
                untried = studies.next_untried_cell(cells, study)
                if untried is not None:  # a small space: every cell once, before TPE
                    study.enqueue_trial(untried)
                trial = study.ask()
                params = studies.suggest(trial, config.searched(), config.removal_kind)
                proposed = time.monotonic()
                self.reporter.start(
                    f"search {config.name}: trial {completed + 1} of {config.trials}", total=1
                )
                earlier = studies.measured_before(study, params)
                if earlier is not None:
                    amount_key = amount_name(config)
                    amount, built = earlier.user_attrs[amount_key], 0.0
                    values = studies.measured_values(earlier)
                    trial.set_user_attr("measured_as", earlier.user_attrs["index"])
                else:
                    with WeightChanges(loaded) as changes:
                        applied = removals.apply(params, changes)
                        built = time.monotonic() - proposed
                        values = objectives.measure(changes.unchanged_below(), dominated)
                    amount_key, amount = applied.amount_name, applied.amount
                trial.set_user_attr("index", completed)
                trial.set_user_attr(amount_key, amount)
                trial.set_user_attr("seconds", round(time.monotonic() - trial_started, 3))
                trial.set_user_attr("removal_seconds", round(built, 3))
                trial.set_user_attr("proposal_seconds", round(proposed - trial_started, 3))
                for name, value in values.items():  # as measured, whatever TPE is told
                    trial.set_user_attr(name, value)
                if "kl" not in values:  # dominated by the dense model: no point of the front
                    studies.tell_dominated(study, trial)
                else:
                    if config.objective == "keep-best" and config.keep_best is not None:
                        trial.set_constraint(
                            str(config.keep_best), limit_excess(values, config.keep_best)
                        )
                    study.tell(
                        trial,
                        sampler_values(values, config.objective, summary.dense, config.keep_best),
                    )
                self.reporter.advance()
                self.reporter.finish()
                ran += 1
                summary.trials = studies.trial_records(study)
                summary.front = _front(summary.trials, config)
                summary.other["updated"] = now_iso()
                _write_summary(summary_path, summary)
        return ran

    def _count_front(
        self,
        summary: SearchSummary,
        summary_path: Path,
        removals: TrialRemovals,
        loaded: Any,
        objectives: Objectives,
    ) -> None:
        """`--refusal score`: the dense model and each front point counted by generation too
        (`counted_refusal`), each count written as it is made, so a rerun counts only new
        points; `counted_front` is the front in those counts, which --keep-best chooses from."""
        counts = summary.other.setdefault(COUNTED, {})
        if summary.dense is not None and "counted_refusal" not in summary.dense:
            summary.dense["counted_refusal"] = objectives.refusal_rate()
        new = [point for point in summary.front if str(point["index"]) not in counts]
        if new:
            info(f"counting {len(new)} new front point(s) by generation (--refusal score)")
        for point in new:
            with WeightChanges(loaded) as changes:
                removals.apply(point["params"], changes)
                counts[str(point["index"])] = objectives.refusal_rate()
            _write_summary(summary_path, summary)
        for point in summary.front:
            point["counted_refusal"] = counts[str(point["index"])]
        summary.other["counted_front"] = studies.pareto_front(
            [_counted(point) for point in summary.front]
        )

    def _control(
        self,
        previous: dict[str, Any] | None,
        front: list[dict[str, Any]],
        removals: TrialRemovals,
        loaded: Any,
        objectives: Objectives,
    ) -> dict[str, Any]:
        """A random removal of the size of the front's lowest-refusal point, measured the same
        way (kept from an earlier run when that point is the same)."""
        best = front[0]
        if previous and previous.get("of_index") == best["index"]:
            return previous
        with WeightChanges(loaded) as changes:
            applied = removals.apply(best["params"], changes)
            changes.restore()
            removals.apply_control(applied, changes, self.config.seed)
            values = objectives.measure(changes.unchanged_below())
        return {
            "of_index": best["index"],
            "params": best["params"],
            applied.amount_name: applied.amount,
            "rule": "masks: per matrix the same count of weights, chosen uniformly at random; "
            "edits: per module the same rank removed in random orthonormal directions",
            "seed": self.config.seed,
        } | values

    def _keep(
        self, front: list[dict[str, Any]], directory: Path, summary: SearchSummary
    ) -> list[str]:
        """`--keep N`: N points spread along the front (both ends first), written by `prune`
        itself, so that they are ordinary masks or edits, named `<search>.t<index>`."""
        config = self.config
        if config.keep == 0 or not front:
            return []
        if config.keep > len(front):
            warn(
                f"--keep {config.keep}: the front has {len(front)} point(s), all kept; more "
                "trials (--trials) may add points"
            )
        names = []
        for point in _spread(front, config.keep):
            name = f"{config.name}.t{point['index']}"
            self.write_point(point, name, directory, summary, overwrite=False)
            names.append(name)
        info(f"kept {len(names)} front point(s): {', '.join(names)}")
        return names

    def _keep_best(
        self, front: list[dict[str, Any]], directory: Path, summary: SearchSummary
    ) -> dict[str, Any] | None:
        """`--keep-best OBJECTIVE:LIMIT`: the rule's point as `<search>.best`, a name a pipeline
        can depend on; rewritten when more trials move it."""
        rule = self.config.keep_best
        if rule is None:
            return None
        if not front:
            warn(
                f"--keep-best {rule}: no trial is on the front (each removed nothing or was "
                f"dominated by the dense model), so nothing is kept as "
                f"{best_name(self.config.name)}"
            )
            return None
        # A rate's limit: a scored search chooses on its front's counts by generation.
        choices = summary.other["counted_front"] if self.config.refusal == "score" else front
        chosen, within = rule.choose(choices)
        point = next(p for p in summary.front if p["index"] == chosen["index"])
        name = best_name(self.config.name)
        moved = (summary.best or {}).get("index") != point["index"]
        self.write_point(point, name, directory, summary, overwrite=moved, rule=str(rule))
        if not within:
            warn(
                f"no front point has {rule.objective} ≤ {rule.limit:g}: kept the nearest, trial "
                f"{point['index']} ({rule.objective} {chosen[rule.objective]:.3g}) as {name}"
            )
        else:
            info(f"kept trial {point['index']} as {name} ({rule})")
        return {"name": name, "index": point["index"], "rule": str(rule), "within_limit": within}

    def write_point(
        self,
        point: dict[str, Any],
        name: str,
        directory: Path,
        summary: SearchSummary,
        *,
        overwrite: bool,
        rule: str | None = None,
    ) -> None:
        """One front point written by `prune` itself (an ordinary mask or edit) whose meta
        names the search, the trial and the prompts it was chosen on."""
        from wandacli.removal.run import run_removal

        origin = {
            "name": self.config.name,
            "directory": str(directory),
            "trial": point["index"],
            "params": point["params"],
            "refusal": point["refusal"],
            **({"counted_refusal": point["counted_refusal"]} if "counted_refusal" in point else {}),
            "kl": point["kl"],
            "prompts": summary.prompts,
        } | ({"rule": rule} if rule else {})
        request = dataclasses.replace(
            prune_config_for(self.config, point["params"], name), search=origin, overwrite=overwrite
        )
        run_removal(request, reporter=self.reporter, command_line=self.command_line)

    def _check_same_request(self, previous: SearchSummary, root: Path) -> None:
        # A search made before --measure-dominated existed measured every trial's KL.
        stored = {"measure_dominated": True} | previous.request
        differences = settings_differences(stored, self.config.request())
        measured_by = previous.objectives.get("refusal")
        if measured_by is not None and measured_by != _refusal_rule(self.config):
            # Trials measured by another rule (an older version's) are not comparable.
            differences.append("its trials measured refusals by an older keyword rule")
        told = previous.objectives.get("sampler")
        if told is not None and told != _sampler_rule(self.config):  # e.g. another --keep-best
            differences.append("its sampler was told another objective (objectives.sampler)")
        if differences:
            raise StoreError(
                f"search {self.config.name!r} in {root} was started with other settings "
                f"({'; '.join(differences[:4])}): use another --name, or remove "
                f"{Store(root).search_dir(self.config.name)} to start it again"
            )


def _front(trials: list[dict[str, Any]], config: SearchConfig) -> list[dict[str, Any]]:
    """The Pareto front of the trials that removed something: a trial that removed nothing (a
    direction where the two means are equal) measured the dense model, which would dominate
    every real removal on KL and is not a point to keep. A trial that repeated an earlier
    one's parameters (`measured_as`) is that point again: it is on the front once."""
    amount = amount_name(config)
    measured = [t for t in trials if t.get(amount, 1.0) != 0 and "measured_as" not in t]
    return studies.pareto_front(measured)


# search.json's counts of a scored front's points by generation, by trial index.
COUNTED = "front_counts"


def _counted(point: dict[str, Any]) -> dict[str, Any]:
    """A scored front point in its count by generation (its score kept as `score`)."""
    return point | {"refusal": point["counted_refusal"], "score": point["refusal"]}


def _sampler_rule(config: SearchConfig) -> str | None:
    return sampler_rule(config.objective, config.keep_best)


def _refusal_rule(config: SearchConfig) -> str:
    if config.refusal == "score":
        return "mean log-odds of a refusal token at the first response position (no generation)"
    return _rate_rule(config)


def _rate_rule(config: SearchConfig) -> str:
    return (
        f"share of greedy {config.max_new_tokens}-token responses that are refusals by the "
        f"keyword rule ({KEYWORD_RULE})"
    )


def _spread(front: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """`count` points of the front evenly spaced by position, both ends first."""
    if count >= len(front):
        return list(front)
    if count == 1:
        return [front[0]]
    step = (len(front) - 1) / (count - 1)
    return [front[round(i * step)] for i in range(count)]


def _write_summary(path: Path, summary: SearchSummary) -> None:
    """The summary as it stands, written atomically (after the request and every trial)."""
    summary.write(path)


def run_search(
    config: SearchConfig, *, reporter: Reporter | None = None, command_line: list[str] | None = None
) -> SearchResult:
    """Search the removal's parameters as `config` says; see the module docstring."""
    return SearchRun(config, reporter=reporter, command_line=command_line).run()
