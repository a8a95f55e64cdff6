"""The settings of `wandacli search`: which removal, over which ranges, measured on which
prompts, for how many trials.

The ranges are not options of their own: every searchable kind of removal declares its search
space (removal/kinds/), and `search` has one `--<parameter> LO:HI` option per searchable
parameter; the parameters given choose the kind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

from wandacli.config.declare import (
    Declared,
    DeclaredField,
    bookkeeping,
    build_fields,
    check_options,
    declared_fields,
    internal,
    nested,
    option,
    or_more,
    settings_json,
)
from wandacli.config.evaluation import (
    PROMPT_TEMPLATE,
    KlSettings,
    data_dir_option,
    held_out_option,
    prompt_column_option,
    template_option,
)
from wandacli.config.ranges import BestRule, ParameterRange
from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ConfigError
from wandacli.removal.kinds import searchable
from wandacli.removal.kinds.base import RemovalKind, Searchable
from wandacli.removal.selection import include_routers_option, layers_option, modules_option

# AdvBench's first 100 prompts are the attack's evaluation set: a search starts after them.
ADVBENCH_OFFSET = 100

RefusalMeasure = Literal["generation", "score"]
SPACE_PANEL = "Search space (one kind)"
MEASURE_PANEL = "Objectives"

# The evaluation sets a search must not read: the first 100 AdvBench behaviours (what the
# reference and the demo evaluate) and JailbreakBench (the second held-out set).
DEFAULT_HELD_OUT = "advbench:100,jailbreakbench"


def best_name(search: str) -> str:
    """The name of the point `--keep-best` (and `--select reference`) keeps: `<search>.best`,
    a name a pipeline can depend on."""
    return f"{search}.best"


def search_flag(name: str) -> str:
    """The flag of a search option or range, by field or range name."""
    for found in [*declared_fields(SearchConfig), *range_options()]:
        if found.name == name:
            return found.declared.flag
    raise KeyError(f"search has no option {name!r}")


def search_parameters() -> dict[str, Searchable]:
    """Every searchable parameter of every kind, by the name its option has (`ratio` for the
    top's `sparsity_ratio`): one `--<name> LO:HI` option each."""
    found: dict[str, Searchable] = {}
    for kind in searchable():
        for parameter in kind.search_space:
            found.setdefault(range_key(parameter), parameter)
    return found


def range_key(parameter: Searchable) -> str:
    """The option's name, as the search's summary and a pipeline's entries name it."""
    return parameter.flag.lstrip("-").replace("-", "_")


def range_options() -> list[DeclaredField]:
    """The search's range options, declared by the kinds' search spaces."""
    return [
        DeclaredField(
            key,
            str | None,
            None,
            Declared(
                flags=(parameter.flag,), help=parameter.help, panel=SPACE_PANEL, metavar="LO:HI"
            ),
            SearchConfig,
            (key,),
        )
        for key, parameter in search_parameters().items()
    ]


@dataclass(frozen=True, init=False)
class SearchConfig:
    """Everything `wandacli search` needs: the sets, one kind's ranges (`ranges`, by the
    kind's parameter names), what the trials measure and how many there are. Ranges may be
    given by their option names too: `SearchConfig(name=..., scores=..., p=..., q=...)`."""

    name: str = option(
        MISSING,
        "--name",
        help="The search's name: STORE/searches/<name>; rerun to resume.",
        request=False,
    )
    scores: str = option(
        MISSING,
        "--scores",
        help="The first set: safety scores (the set difference, --ratio), safety rank "
        "statistics (the orthogonal projection) or harmful mean activations (the refusal "
        "direction).",
    )
    model: ModelSpec = nested(ModelSpec)
    store: Path | None = option(
        None,
        "--store",
        "-s",
        help="Store of the sets; the search and kept points are written there [default: the "
        "store holding --scores, else ./wandacli-store].",
        panel="Store",
        request=False,
    )
    utility_scores: str | None = option(
        None,
        "--utility-scores",
        help="The second set: utility scores, utility rank statistics or harmless mean "
        "activations.",
    )
    ranges: dict[str, ParameterRange] = internal(None, request=False)
    layers: str | None = layers_option(SPACE_PANEL)
    modules: str | None = modules_option(SPACE_PANEL)
    include_routers: bool = include_routers_option(SPACE_PANEL)
    trials: int = option(
        40,
        "--trials",
        help="Complete trials to reach (a rerun with more continues).",
        check=or_more(1),
        request=False,
    )
    startup_trials: int = option(
        10,
        "--startup-trials",
        help="Random trials before TPE models the front.",
        check=or_more(1),
    )
    sampler: Literal["tpe", "multivariate-tpe", "gp"] = option(
        "tpe",
        "--sampler",
        help="tpe: Optuna's TPE, each parameter modelled on its own; multivariate-tpe: their "
        "joint density (heretic's choice), which follows interactions such as a direction's "
        "layer with its kernel's peak; gp: Optuna's Gaussian-process sampler (expected "
        "hypervolume improvement; constrained expected improvement under --objective "
        "keep-best). A small integer space is tried cell by cell first either way.",
    )
    keep: int = option(
        0,
        "--keep",
        help="Write N front points into the store as masks or edits named <name>.t<trial>.",
        check=or_more(0),
        request=False,
    )
    keep_best: BestRule | None = option(
        None,
        "--keep-best",
        metavar="OBJECTIVE:LIMIT",
        help="Also write, as <name>.best, the front point lowest in the other objective among "
        "those with OBJECTIVE ≤ LIMIT: refusal:0.5 (the cheapest that halves refusals) or "
        "kl:0.1 (the fewest refusals within a KL budget).",
        cli_type=str | None,
        parse=BestRule.parse,
        format=str,
        request=False,
    )
    seed: int = option(
        0, "--seed", help="TPE's proposals, and the random control's draw (its seed)."
    )
    prompts: str = option(
        "advbench",
        "--prompts",
        metavar="<NAME|FILE>",
        help="Harmful search prompts: a prompt set, a pair set's prompts, or a file.",
        panel=MEASURE_PANEL,
    )
    prompt_column: str | None = prompt_column_option(MEASURE_PANEL)
    # None: ADVBENCH_OFFSET for AdvBench (its first 100 are the attack's evaluation prompts),
    # 0 for any other set (a user's 8-prompt file is searched whole). Resolved when the
    # settings are made, so requests record the number (AdvBench's as before: 100).
    offset: int | None = option(
        None,
        "--offset",
        help="Skip the first N prompts [default: 100 for advbench, whose first 100 are the "
        "attack's evaluation prompts; 0 for any other set].",
        panel=MEASURE_PANEL,
        check=or_more(0),
    )
    limit: int = option(
        32, "--limit", help="Search prompts used.", panel=MEASURE_PANEL, check=or_more(1)
    )
    held_out: str = held_out_option(DEFAULT_HELD_OUT, "the search prompts", MEASURE_PANEL)
    refusal: RefusalMeasure = option(
        "generation",
        "--refusal",
        help="generation: share of short greedy responses with a refusal phrase; score: "
        "log-odds of a refusal token at the first response position, no generation (a "
        "cheaper trial); the front's points are then counted by generation, and --keep-best "
        "chooses on those counts.",
        panel=MEASURE_PANEL,
    )
    max_new_tokens: int = option(
        24,
        "--max-new-tokens",
        help="Tokens per search response (--refusal generation; with --refusal score, "
        "per response of the front's count).",
        panel=MEASURE_PANEL,
        check=or_more(1),
    )
    kl_settings: KlSettings = nested(KlSettings)
    # What TPE is told of each trial (search/objectives.py `sampler_values`); the front, the
    # kept points and search.json keep the measured refusal and KL either way.
    objective: Literal["wandacli", "heretic", "keep-best"] = option(
        "wandacli",
        "--objective",
        help="wandacli: TPE minimises the refusal rate and the KL as measured; heretic: "
        "heretic's terms, refusals ÷ the dense model's and KL, the KL term replaced by "
        "0.01 × the refusal term below a KL of 0.01 (so doing nothing is not optimal); "
        "keep-best: TPE minimises --keep-best's other objective with its limit as a "
        "constraint, spending the trials near the point that will be kept rather than along "
        "the whole front.",
        panel=MEASURE_PANEL,
    )
    measure_dominated: bool = option(
        True,
        "--measure-dominated/--skip-dominated",
        help="--skip-dominated: a trial that refuses as much as the dense model (or more) is "
        "dominated by it whatever its KL, so its KL is not measured and the sampler is told "
        "it was pruned (not where the front is); by default every trial's KL is measured, "
        "as heretic measures it (--objective keep-best always does).",
        panel=MEASURE_PANEL,
    )
    batch_size: int = option(
        32,
        "--batch-size",
        help="Sequences per forward pass or generation batch.",
        panel=MEASURE_PANEL,
        check=or_more(1),
    )
    template: PROMPT_TEMPLATE | None = template_option(
        "Prompt template [default: chat when the tokenizer has one].", MEASURE_PANEL
    )
    control: bool = option(
        True,
        "--control/--no-control",
        help="Measure a random removal of the size of the front's lowest-refusal point.",
        request=False,
    )
    data_dir: Path | None = data_dir_option()
    # "tpe": Optuna's search; "reference": the refusal-direction reference's selection over
    # every candidate (layer, position) in the ranges (search/select.py).
    select: Literal["tpe", "reference"] = option(
        "tpe",
        "--select",
        help="tpe: Optuna's two-objective search; reference: the refusal-direction "
        "reference's selection over every (layer, position) in the ranges (filters: the last "
        "20% of layers, KL > 0.1, an induced refusal score < 0; then the lowest bypass "
        "score), kept as <name>.best.",
        panel=SPACE_PANEL,
    )

    def __init__(self, **values: Any) -> None:
        """Fields by name; ranges as `ranges={...}` or by their option names."""
        known = {f.name for f in dataclasses.fields(self)}
        parameters = search_parameters()
        ranges = dict(values.pop("ranges", None) or {})
        for key in [k for k in values if k in parameters]:
            chosen = values.pop(key)
            if chosen is not None:
                ranges[parameters[key].name] = chosen
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"SearchConfig has no field {unknown[0]!r}")
        for item in dataclasses.fields(self):
            if item.name in values:
                value = values[item.name]
            elif item.default is not MISSING:
                value = item.default
            elif item.default_factory is not MISSING:
                value = item.default_factory()
            else:
                raise TypeError(f"SearchConfig needs {item.name!r}")
            object.__setattr__(self, item.name, value)
        object.__setattr__(self, "ranges", ranges)
        self.__post_init__()

    @property
    def prompt_offset(self) -> int:
        """--offset as resolved (`__post_init__` fills in the set's default)."""
        assert self.offset is not None
        return self.offset

    def __post_init__(self) -> None:
        if self.offset is None:
            offset = ADVBENCH_OFFSET if self.prompts == "advbench" else 0
            object.__setattr__(self, "offset", offset)
        kind = self._check_kind()
        check_options(self)
        if self.select == "reference" and kind.name != "direction":
            raise ConfigError(
                "--select reference chooses a refusal direction: give --direction-layer (and "
                "--direction-position) with two mean-activations sets"
            )
        if self.select == "reference" and "direction_scale" in self.ranges:
            raise ConfigError(
                "--select reference scores whole directions, as the reference does: drop "
                "--direction-scale"
            )
        if self.objective == "keep-best" and self.keep_best is None:
            raise ConfigError(
                "--objective keep-best steers TPE towards the point --keep-best keeps: give "
                "--keep-best OBJECTIVE:LIMIT, e.g. refusal:0.5"
            )
        if self.refusal == "score" and self.objective == "heretic":
            raise ConfigError(
                "--objective heretic divides refusals by the dense model's, which a refusal "
                "score (log-odds) cannot be: give --refusal generation, or --objective wandacli"
            )
        if (
            self.refusal == "score"
            and self.objective == "keep-best"
            and self.keep_best is not None
            and self.keep_best.objective == "refusal"
        ):
            raise ConfigError(
                f"--objective keep-best with --keep-best {self.keep_best} bounds each trial's "
                "refusal rate, which --refusal score does not measure: give --refusal "
                "generation, or --objective wandacli"
            )
        if kind.name == "ratio" and self.utility_scores is not None:
            raise ConfigError("--ratio searches the top of --scores alone: drop --utility-scores")
        if kind.name != "ratio" and self.utility_scores is None:
            raise ConfigError(f"the {kind.search_name} needs --utility-scores")

    def _check_kind(self) -> RemovalKind:
        """Exactly one kind's ranges, each range within what it may be."""
        names = set(self.ranges)
        matching = [kind for kind in searchable() if kind.accepts(names)]
        if not matching:
            given = [p.flag for p in search_parameters().values() if p.name in names]
            usage = "; ".join(kind.search_usage for kind in searchable())
            raise ConfigError(
                f"search one kind of removal: {usage}; got {', '.join(given) or 'no range'}"
            )
        kind = matching[0]
        for parameter in kind.search_space:
            chosen = self.ranges.get(parameter.name)
            if chosen is not None and parameter.check is not None:
                parameter.check(chosen, parameter.flag)
        return kind

    @property
    def removal_kind(self) -> RemovalKind:
        names = set(self.ranges)
        return next(kind for kind in searchable() if kind.accepts(names))

    @property
    def kind(self) -> str:
        """The kind's name as searches record it (`top` for the top of a score set)."""
        return self.removal_kind.search_name

    @property
    def is_edit(self) -> bool:
        return self.removal_kind.family == "edit"

    def searched(self) -> dict[str, ParameterRange]:
        """The ranges a trial draws from, by parameter name, in the kind's order (a
        parameter searched at a fixed value where the kind says so)."""
        found: dict[str, ParameterRange] = {}
        for parameter in self.removal_kind.search_space:
            chosen = self.ranges.get(parameter.name)
            if chosen is None and parameter.ranged_when_fixed and parameter.fixed is not None:
                chosen = ParameterRange(parameter.fixed, parameter.fixed, parameter.integer)
            if chosen is not None:
                found[parameter.name] = chosen
        return found

    def request(self) -> dict[str, Any]:
        """What decides the trials (a rerun with the same request continues the study; the
        number of trials and what is kept may grow)."""
        data = {k: v for k, v in self.to_json().items() if k not in bookkeeping(SearchConfig)}
        from wandacli.models.loader import resolved_dtype

        data["model"] = {"model": self.model.model, "dtype": resolved_dtype(self.model)}
        return data

    def to_json(self) -> dict[str, Any]:
        """Every setting, as search.json records it (each range by its option's name)."""
        data = settings_json(self)
        data.pop("ranges")
        data.update(data.pop("kl_settings"))
        data["model"].pop("auto_dtype", None)
        searched = self.searched()
        for key, parameter in search_parameters().items():
            chosen = (
                searched.get(parameter.name)
                if parameter in self.removal_kind.search_space
                else None
            )
            data[key] = chosen.to_json() if chosen is not None else None
        data["kind"] = self.kind
        return data


def search_config(params: dict[str, Any]) -> SearchConfig:
    """A SearchConfig from flat option values (the command line's): ranges parsed by their
    parameters."""
    values = build_fields(SearchConfig, params)
    for key, parameter in search_parameters().items():
        if params.get(key) is not None:
            values[key] = parameter.parse(params[key])
    return SearchConfig(**values)
