"""The Optuna study behind `wandacli search`, kept in the store as a journal file.

Optuna rather than a hand-written optimiser: its multi-objective TPE sampler is what heretic
uses for the same kind of search, its journal storage appends and fsyncs each trial as it is
asked and told (a killed search loses only the trial it was running), and its Pareto-front
bookkeeping is tested by its maintainers.

Reproducible across interruptions: each trial's sampler is seeded from the search's seed and
the number of trials completed before it, and TPE reads only completed trials, so a search
killed and resumed proposes the same parameters as one that ran through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wandacli.config.ranges import ParameterRange
from wandacli.removal.kinds.base import RemovalKind
from wandacli.search.config import SearchConfig

# Both minimised: the refusal left, the cost to utility (the summary's order).
from wandacli.store.summaries import OBJECTIVES, is_complete

JOURNAL_NAME = "journal.log"
STUDY_NAME = "wandacli-search"


def _quiet_optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _recover_journal(path: Path) -> None:
    """Cut a line left half-written by a kill: Optuna refuses a journal whose last complete
    line follows an incomplete one, which the next append would make."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as handle:
            handle.truncate(keep)


def told_objectives(config: SearchConfig) -> int:
    """How many values the sampler is told of a trial: the refusal and the KL, or under
    `--objective keep-best` the rule's other objective alone (its limit is a constraint)."""
    return 1 if config.objective == "keep-best" else len(OBJECTIVES)


def open_study(directory: Path, objectives: int = len(OBJECTIVES)) -> Any:
    """The study in DIR/journal.log, created when new, minimising `objectives` values; trials
    left running by a killed process are marked failed (they are not counted and their
    parameters are asked again)."""
    optuna = _quiet_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = directory / JOURNAL_NAME
    _recover_journal(path)
    # The search's own lock admits one process, so a journal lock file still here was left by
    # a killed one: without removing it, Optuna would wait out its 30-second grace period.
    for stale in directory.glob(f"{JOURNAL_NAME}.lock*"):
        stale.unlink(missing_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        directions=["minimize"] * objectives,
        load_if_exists=True,
    )
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


# A trial's user attribute: it refused as much as the dense model, which dominates it
# whatever its KL (search/objectives.py `dominated_from`); its KL was not measured.
DOMINATED = "dominated_by_dense"


def finished_trials(study: Any) -> list[Any]:
    """The trials that count towards `--trials`: complete ones, and those stopped as
    dominated by the dense model (Optuna's PRUNED: TPE models them with the trials it places
    away from the front, whatever their values would have been)."""
    optuna = _quiet_optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def tell_dominated(study: Any, trial: Any) -> None:
    """Tell the study a trial was dominated by the dense model (its refusal is recorded, its
    KL was not measured)."""
    optuna = _quiet_optuna()
    trial.set_user_attr(DOMINATED, True)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def measured_before(study: Any, params: dict[str, Any]) -> Any | None:
    """The first finished trial with exactly these parameters, or None. TPE proposes a point
    again when it still looks best (on the direction's integer grid, 5 of the study's 24
    trials); a removal and its measures are deterministic, so the earlier measures stand."""
    for trial in finished_trials(study):
        if trial.params == params:
            return trial
    return None


def sampler_for(config: SearchConfig, completed: int) -> Any:
    """The sampler that asks trial `completed` + 1: seeded by the search seed and the count;
    TPE on each parameter alone, on their joint density (`--sampler multivariate-tpe`), or a
    Gaussian process over them all (`--sampler gp`)."""
    import warnings

    optuna = _quiet_optuna()
    seed = config.seed * 1_000_003 + completed
    with warnings.catch_warnings():  # Optuna calls these options experimental; they are its own
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if config.sampler == "gp":
            _import_quietly("optuna._gp.batched_lbfgsb")
            # A trial's measures are deterministic (greedy decoding, fixed prompts): the GP
            # interpolates them instead of modelling noise.
            return optuna.samplers.GPSampler(
                seed=seed,
                n_startup_trials=config.startup_trials,
                deterministic_objective=True,
                warn_independent_sampling=False,
            )
        joint = config.sampler == "multivariate-tpe"
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=config.startup_trials,
            multivariate=joint,
            group=joint,  # a kind's conditional parameters get their own joint model
        )


def _import_quietly(module: str) -> None:
    """Import one of Optuna's modules with its log at ERROR: the GP's optimiser says, as it is
    imported, that an optional package (greenlet) might make its proposals faster; a note on
    speed, not on the search, in the middle of the search's output."""
    import contextlib
    import importlib

    optuna = _quiet_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with contextlib.suppress(ImportError):  # a private module: gone in another version
            importlib.import_module(module)
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def grid_cells(ranges: dict[str, ParameterRange], trials: int, seed: int) -> list[dict[str, float]]:
    """Every cell of a small integer space, in a seeded order, when the search's trials can
    try them all (every range that varies an integer, at most `trials` cells); else none. TPE, from a few
    random startup trials, can leave cells of such a space untried that a grid would not (the
    study's 24 trials over 80 cells never tried the demo's best); so a small space is tried
    cell by cell first, and TPE proposes the rest. A range fixed at one value (`LO` = `HI`, a
    float too) is no axis of the space: each cell carries its value."""
    import itertools
    import math
    import random

    varying = {name: r for name, r in ranges.items() if r.low != r.high}
    if not varying or not all(r.integer for r in varying.values()):
        return []
    axes = [range(int(r.low), int(r.high) + 1) for r in varying.values()]
    if math.prod(len(axis) for axis in axes) > trials:
        return []
    fixed = {
        name: int(r.low) if r.integer else r.low
        for name, r in ranges.items()
        if name not in varying
    }
    cells = [fixed | dict(zip(varying, values, strict=True)) for values in itertools.product(*axes)]
    random.Random(seed).shuffle(cells)
    return cells


def next_untried_cell(cells: list[dict[str, float]], study: Any) -> dict[str, float] | None:
    """The first cell no finished trial has measured (None: all of them have)."""
    tried = [dict(t.params) for t in finished_trials(study)]
    return next((cell for cell in cells if cell not in tried), None)


def suggest(trial: Any, ranges: dict[str, ParameterRange], kind: RemovalKind) -> dict[str, Any]:
    """Fractions of weights on a log scale (the top 2% and 20% are as far apart as 0.2% and
    2%), what the kind declares linear (a direction's scale) on a linear one, ranks and layers
    as integers."""
    linear = {parameter.name for parameter in kind.search_space if parameter.linear}
    params: dict[str, Any] = {}
    for name, chosen in ranges.items():
        if chosen.integer:
            params[name] = trial.suggest_int(name, int(chosen.low), int(chosen.high))
        else:
            params[name] = trial.suggest_float(
                name, chosen.low, chosen.high, log=name not in linear
            )
    return params


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete trials no other complete trial dominates (both objectives as low or
    lower, one lower), ordered by refusal, then KL, then index. Computed from the recorded
    values, so the front of a resumed search is compared exactly with an uninterrupted one."""
    complete = [t for t in trials if is_complete(t)]
    front = []
    for trial in complete:
        a = [trial[name] for name in OBJECTIVES]
        dominated = any(
            all(o[name] <= v for name, v in zip(OBJECTIVES, a, strict=True))
            and any(o[name] < v for name, v in zip(OBJECTIVES, a, strict=True))
            for o in complete
        )
        if not dominated:
            front.append(trial)
    return sorted(front, key=lambda t: (t["refusal"], t["kl"], t["index"]))


def measured_values(trial: Any) -> dict[str, float]:
    """A finished trial's refusal and KL as measured (its user attributes; TPE may have been
    told heretic's terms of them, or one of them), or as told where it predates the record;
    the refusal alone where it was dominated by the dense model."""
    told = dict(zip(OBJECTIVES, trial.values or (), strict=False))
    return {
        name: float(value)
        for name in OBJECTIVES
        if (value := trial.user_attrs.get(name, told.get(name))) is not None
    }


def trial_records(study: Any) -> list[dict[str, Any]]:
    """Every trial as `search --json` prints it."""
    records = []
    for trial in study.get_trials(deepcopy=False):
        record: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "params": dict(trial.params),
        }
        record.update(trial.user_attrs)
        record.update(measured_values(trial))
        records.append(record)
    return records
