"""What `wandacli prune` is asked for: the options every removal has (the sets, the modules,
the outputs) and one kind's settings (removal/kinds/). `removal_request` makes one from flat
option values, as the command line and a pipeline give them: it finds the kind the options ask
for in the registry and refuses, in one line, options of another kind."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from wandacli.config.declare import (
    build,
    check_options,
    declared_fields,
    internal,
    nested,
    option,
    request_of,
    settings_json,
    to_json_value,
)
from wandacli.config.settings import AUTO_DTYPE_HELP, ModelSpec
from wandacli.core.errors import ConfigError
from wandacli.removal.kinds import (
    DEFAULT_KIND,
    KINDS,
    family_defaults,
    kind_named,
    kind_options,
    owners,
)
from wandacli.removal.kinds.base import RemovalKind, refuse_foreign_option
from wandacli.removal.selection import include_routers_option, layers_option, modules_option

STORE_PANEL = "Store"
FILTERS_PANEL = "Filters"
OUTPUTS_PANEL = "Outputs"


@dataclass(frozen=True)
class RemovalRequest:
    """Everything `wandacli prune` needs: the options every removal has, and `settings`, the
    options of its `kind`."""

    scores: str = option(
        MISSING,
        "--scores",
        help="The set the removal is computed from, by name (in --store) or as the path of its "
        ".h5 file: per-weight scores (masks; with --utility-scores the safety set), rank "
        "statistics (rank edits) or harmful mean activations (a refusal direction).",
    )
    store: Path | None = option(
        None,
        "--store",
        "-s",
        help="Store to read names from and write the mask or edit to [default: the store "
        "holding --scores, else ./wandacli-store].",
        panel=STORE_PANEL,
        request=False,
    )
    layers: str | None = layers_option(FILTERS_PANEL)
    modules: str | None = modules_option(FILTERS_PANEL)
    include_routers: bool = include_routers_option(FILTERS_PANEL)
    name: str | None = option(
        None,
        "--name",
        help="Mask or edit name [default: derived from the settings].",
        panel=STORE_PANEL,
        request=False,
    )
    model: ModelSpec | None = nested(
        ModelSpec,
        optional_by="model",
        overrides={
            "model": {
                "default": None,
                "help": "The model the sets were computed on: its shapes are checked (from its "
                "config alone for a mask); required by --save-model and by rank edits, which "
                "project its weights.",
            },
            "dtype": {"help": AUTO_DTYPE_HELP["checkpoint"]},
        },
    )
    save_model: Path | None = option(
        None,
        "--save-model",
        help="Save the model with the mask or edit applied here (safetensors, atomic).",
        panel=OUTPUTS_PANEL,
        request=False,
    )
    recover_from_base: str | None = option(
        None,
        "--recover-from-base",
        help="Masks, with --save-model: copy this base model's weights into the pruned "
        "positions instead of zeros.",
        panel=OUTPUTS_PANEL,
        request=False,
    )
    export_mask: Path | None = option(
        None,
        "--export-mask",
        help="Masks: also write the reference's fine-tuning mask (.pt: module name → bool "
        "tensor; True = pruned with --prune-highest, True = kept otherwise).",
        panel=OUTPUTS_PANEL,
        request=False,
    )
    overwrite: bool = option(
        False, "--overwrite", help="Replace an existing result of the same name.", request=False
    )
    kind: str = internal(DEFAULT_KIND.name)
    settings: Any = internal(None)
    # Set by `search --keep`: the search and trial that chose these parameters (bookkeeping).
    search: dict[str, Any] | None = internal(None)

    @property
    def removal_kind(self) -> RemovalKind:
        return kind_named(self.kind)

    @property
    def family(self) -> str:
        return self.removal_kind.family

    def request(self) -> dict[str, Any]:
        """What decides the removal's numbers: the sets and modules, and every option of the
        kind's family (at its default where this kind does not read it, as files made before
        kinds had modules recorded them); the model and its dtype where the kind reads the
        weights."""
        kind = self.removal_kind
        values = {
            name: to_json_value(value)
            for name, value in family_defaults(kind.family).items()
            if not _omitted_at_default(name, value)
        }
        values.update(request_of(self.settings))
        values.update(request_of(self))
        if kind.reads_model(self.settings) and self.model is not None:
            from wandacli.models.loader import resolved_dtype

            values["model"] = {"model": self.model.model, "dtype": resolved_dtype(self.model)}
        return values

    @contextlib.contextmanager
    def open_sets(self) -> Iterator[tuple[Any, str]]:
        """The sets the kind reads, open, and the removal's name (given, or derived)."""
        from wandacli.store.files import store_root_for

        kind = self.removal_kind
        with kind.open(self, store_root_for(self.scores, self.store)) as sets:
            kind.check_sets(self.settings, sets, self)
            yield sets, self.name or kind.default_name(self, sets)

    def to_json(self) -> dict[str, Any]:
        """Every setting, as the file's meta records it: every option of the kind's family
        (at its default where the kind does not read it), as files always recorded them."""
        data = settings_json(self)
        data.pop("settings")
        data.update({k: to_json_value(v) for k, v in family_defaults(self.family).items()})
        data.update(settings_json(self.settings))
        if isinstance(data.get("model"), dict):
            data["model"].pop("auto_dtype", None)
        return data


def _omitted_at_default(name: str, value: Any) -> bool:
    for kind in KINDS:
        for found in declared_fields(kind.settings):
            if found.name == name:
                return found.declared.request_omits_default and value == found.default
    return False


# Options only a mask has: where the pruned weights come from, the reference's export.
MASK_OUTPUTS = ("recover_from_base", "export_mask")


def removal_request(params: dict[str, Any]) -> RemovalRequest:
    """The request flat option values ask for: the first kind in the registry whose options
    were given (or the default kind), its settings, every rule checked."""
    given = {
        option.name: params[option.name]
        for option in kind_options()
        if option.name in params
        and params[option.name] is not None
        and params[option.name] != option.default
    }
    claimers = [kind for kind in KINDS if kind.claims(given)] or [
        kind for kind in KINDS if kind.claims_alone(given)
    ]
    chosen = claimers[0] if claimers else DEFAULT_KIND
    settings = build(chosen.settings, params)
    check_options(settings)
    # Options of one other kind first: theirs is the clearer message.
    foreign = sorted(
        (n for n in given if n not in chosen.option_names), key=lambda n: len(owners(n))
    )
    if foreign:
        refuse_foreign_option(prune_flag(foreign[0]), owners(foreign[0]), chosen, claimers)
    common = {k: v for k, v in params.items() if k in _common_names()}
    request = build(RemovalRequest, common)
    if request.model is not None:  # prune's `--dtype auto` is the checkpoint's dtype
        request = dataclasses.replace(request, model=request.model.keeping_checkpoint_dtype())
    request = dataclasses.replace(request, kind=chosen.name, settings=settings)
    check_request(request)
    return request


def check_request(request: RemovalRequest) -> None:
    """The kind's own rules, then those every removal shares."""
    kind = request.removal_kind
    kind.check(request.settings, request)
    if kind.family == "edit":
        for name in MASK_OUTPUTS:
            if getattr(request, name) is not None:
                raise ConfigError(
                    f"{prune_flag(name)} is a mask's output; {kind.title} {kind.does}: drop it"
                )
    if request.save_model is not None and request.model is None:
        raise ConfigError("--save-model needs --model (the model the sets were computed on)")
    if request.recover_from_base is not None and request.save_model is None:
        raise ConfigError("--recover-from-base only changes a saved model: add --save-model OUT")


def _common_names() -> set[str]:
    return {f.name for f in declared_fields(RemovalRequest)}


def prune_flag(name: str) -> str:
    """The flag of a `prune` option (a kind's or one every removal has), by field name."""
    for found in [*kind_options(), *declared_fields(RemovalRequest)]:
        if found.name == name:
            return found.declared.flag
    raise KeyError(f"prune has no option {name!r}")


class RequestRun:
    """What a `prune` run of either family holds: the request, its kind, the sets the kind
    opened, the removal's name, where progress goes and how it was asked for."""

    def __init__(
        self,
        request: RemovalRequest,
        sets: Any,
        name: str,
        *,
        reporter: Any,
        command_line: list[str],
    ) -> None:
        self.request = request
        self.kind: Any = request.removal_kind
        self.sets = sets
        self.name = name
        self.reporter = reporter
        self.command_line = command_line

    @classmethod
    def of(
        cls, request: RemovalRequest, *, reporter: Any = None, command_line: list[str] | None = None
    ) -> Any:
        """The request's sets opened, the run done (each family's `run`), the sets closed."""
        import sys

        from wandacli.core.console import NullReporter

        with request.open_sets() as (sets, name):
            return cls(
                request,
                sets,
                name,
                reporter=reporter or NullReporter(),
                command_line=command_line if command_line is not None else sys.argv,
            ).run()

    def run(self) -> Any:
        raise NotImplementedError
