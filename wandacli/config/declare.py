"""Each option declared once: a settings dataclass's field carries its flag, help, panel and
validation, and everything else is derived from that one declaration:

- the command line: `cli/build.py` turns a settings class into Typer parameters;
- TOML keys: the field names (a config file's `[prune]` table sets `sparsity_ratio`);
- the request fingerprint: the fields marked `request=True` (what changes the numbers);
- the pipeline's flags: `flag_of(Settings, "direction_layer")` is "--direction-layer", so a
  renamed flag is renamed in every rule the pipeline writes.

A field is declared with `option(default, "--flag", help=...)`; a group of fields that belongs
together (the model: --model, --dtype, --device, ...) is a settings class of its own, declared
once and embedded with `nested(ModelSpec)`: its options appear flat on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from typing import Any

from wandacli.core.errors import ConfigError

OPTION = "wandacli.option"
NESTED = "wandacli.nested"

Check = Callable[[Any, str], None]


@dataclass(frozen=True)
class Declared:
    """One option: how the command line spells it and what a value must be."""

    flags: tuple[str, ...]
    help: str
    panel: str | None = None
    metavar: str | None = None
    # What the command line parses when the field holds something else (a range "LO:HI" read
    # into a ParameterRange, a comma list into a tuple): `parse` turns one into the other.
    cli_type: Any = None
    parse: Callable[[Any], Any] | None = None
    # The inverse of `parse`: a value as the command line writes it (defaults in --help, the
    # pipeline's flags).
    format: Callable[[Any], Any] | None = None
    check: Check | None = None
    # A required option's one-line error when it is missing (the field has no default).
    required: str | None = None
    # Part of the request: a finished result made with other values of it is another result.
    request: bool = True
    # Left out of the request at its default (an option added after results were stored).
    request_omits_default: bool = False
    argument: bool = False  # positional
    cli: bool = True  # False: set by code (e.g. `search --keep` records its origin)

    @property
    def flag(self) -> str:
        """The long flag as a user types it (the first of a `--x/--no-x` pair)."""
        first = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return first.split("/")[0]


@dataclass(frozen=True)
class Nested:
    """A settings class embedded flat in another: per-command overrides of its options'
    help and defaults, and the option whose absence leaves the whole group None."""

    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    optional_by: str | None = None
    only: tuple[str, ...] | None = None  # the group's options this command has (None: all)


def option(
    default: Any = MISSING,
    *flags: str,
    help: str,
    panel: str | None = None,
    metavar: str | None = None,
    cli_type: Any = None,
    parse: Callable[[Any], Any] | None = None,
    format: Callable[[Any], Any] | None = None,
    check: Check | None = None,
    required: str | None = None,
    request: bool = True,
    request_omits_default: bool = False,
    argument: bool = False,
    cli: bool = True,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field that is an option (see the module docstring)."""
    declared = Declared(
        flags=flags,
        help=help,
        panel=panel,
        metavar=metavar,
        cli_type=cli_type,
        parse=parse,
        format=format,
        check=check,
        required=required,
        request=request,
        request_omits_default=request_omits_default,
        argument=argument,
        cli=cli,
    )
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={OPTION: declared})
    return field(default=default, metadata={OPTION: declared})


def internal(default: Any = None, *, request: bool = False) -> Any:
    """A field set by code, never by a flag (no command line, no TOML key)."""
    return option(default, help="", cli=False, request=request)


def nested(
    cls: type,
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    optional_by: str | None = None,
    only: tuple[str, ...] | None = None,
) -> Any:
    """A settings class embedded in another; `optional_by`: the group is None unless that
    option of it is given (prune reads a model only when --model names one); `only`: the
    group's options this command offers (the others keep their defaults)."""
    spec = Nested(overrides=overrides or {}, optional_by=optional_by, only=only)
    if optional_by is not None:
        return field(default=None, metadata={NESTED: spec})
    return field(default_factory=cls, metadata={NESTED: spec})


# ---------------------------------------------------------------------------------------------
# Reading the declarations


@dataclass(frozen=True)
class DeclaredField:
    """One option of a settings class, flattened: nested groups contribute theirs."""

    name: str
    type: Any
    default: Any
    declared: Declared
    owner: type  # the settings class that declares it
    path: tuple[str, ...]  # field names from the outer class down, e.g. ("model", "dtype")


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested_class(annotation: Any) -> type:
    """ModelSpec from `ModelSpec` or `ModelSpec | None`."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    raise TypeError(f"nested() needs a dataclass type, got {annotation!r}")


def declared_fields(cls: type, *, cli_only: bool = True) -> Iterator[DeclaredField]:
    """Every option of `cls`, nested groups flattened, in declaration order."""
    yield from _declared(cls, (), {}, cli_only)


def _declared(
    cls: type, path: tuple[str, ...], overrides: dict[str, dict[str, Any]], cli_only: bool
) -> Iterator[DeclaredField]:
    types = field_types(cls)
    for item in dataclasses.fields(cls):
        if NESTED in item.metadata:
            spec: Nested = item.metadata[NESTED]
            inner = _nested_class(types[item.name])
            for found in _declared(inner, (*path, item.name), spec.overrides, cli_only):
                if spec.only is None or found.name in spec.only:
                    yield found
            continue
        declared = item.metadata.get(OPTION)
        if declared is None or (cli_only and not declared.cli):
            continue
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        changed = overrides.get(item.name, {})
        if "help" in changed:
            declared = dataclasses.replace(declared, help=changed["help"])
        if "panel" in changed:
            declared = dataclasses.replace(declared, panel=changed["panel"])
        default = changed.get("default", default)
        yield DeclaredField(item.name, types[item.name], default, declared, cls, (*path, item.name))


def flag_of(cls: type, name: str) -> str:
    """The flag of option `name` of `cls` (nested groups included): the one spelling the
    pipeline writes, so that a renamed option fails where the rules are made."""
    for found in declared_fields(cls):
        if found.name == name:
            return found.declared.flag
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def option_names(cls: type) -> set[str]:
    return {f.name for f in declared_fields(cls)}


def command_text(declared: Declared, value: Any) -> Any:
    """A field's value as the command line gives it (its option's `format`)."""
    if value is None or declared.format is None:
        return value
    return declared.format(value)


def build(cls: type, params: dict[str, Any]) -> Any:
    """An instance of settings class `cls` from flat option values (a command's parsed
    parameters, or a pipeline entry): each value through its option's `parse`; nested groups
    built from their own options. Options not in `params` keep their defaults."""
    return cls(**build_fields(cls, params))


def build_fields(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `build` gives `cls`."""
    kwargs: dict[str, Any] = {}
    types = field_types(cls)
    for item in dataclasses.fields(cls):
        if NESTED in item.metadata:
            spec: Nested = item.metadata[NESTED]
            if spec.optional_by is not None and params.get(spec.optional_by) is None:
                kwargs[item.name] = None
                continue
            kwargs[item.name] = build(_nested_class(types[item.name]), params)
            continue
        declared = item.metadata.get(OPTION)
        if declared is None or not declared.cli or item.name not in params:
            continue
        value = params[item.name]
        if value is None and declared.required is not None:
            raise ConfigError(declared.required)
        if value is None and (item.default is not None or item.default_factory is not MISSING):
            continue  # not given where the command line has no spelling of the default
        if declared.parse is not None and value is not None:
            value = declared.parse(value)
        kwargs[item.name] = value
    return kwargs


def check_options(settings: Any) -> None:
    """Each option's own rule, in declaration order (the first failure is the one line the
    user sees); rules that relate options are the settings class's own."""
    for item in dataclasses.fields(settings):
        declared = item.metadata.get(OPTION)
        if declared is None or declared.check is None:
            continue
        value = getattr(settings, item.name)
        if value is not None:
            declared.check(value, declared.flag)


def given_options(settings: Any) -> dict[str, Any]:
    """The options of `settings` that differ from their defaults, by field name."""
    found = {}
    for item in dataclasses.fields(settings):
        if OPTION not in item.metadata or not item.metadata[OPTION].cli:
            continue
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        value = getattr(settings, item.name)
        if value != default:
            found[item.name] = value
    return found


def bookkeeping(cls: type) -> frozenset[str]:
    """The options of `cls` (nested groups left out) that are not part of its request: where
    a result goes, how it is kept, how it looks."""
    return frozenset(
        item.name
        for item in dataclasses.fields(cls)
        if OPTION in item.metadata and not item.metadata[OPTION].request
    )


def omitted_at_default(cls: type) -> dict[str, Any]:
    """The options of `cls` a request leaves out at their default (JSON values): options added
    later, so that requests recorded before them still match."""
    return {
        item.name: to_json_value(item.default)
        for item in dataclasses.fields(cls)
        if OPTION in item.metadata and item.metadata[OPTION].request_omits_default
    }


def request_of(settings: Any, names: set[str] | None = None) -> dict[str, Any]:
    """The request: every option declared `request=True` (of `names` only, when given), as
    JSON values; nested groups as `{group: {option: value}}`."""
    found: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if NESTED in item.metadata:
            continue  # each command says which of a group's options its numbers depend on
        declared = item.metadata.get(OPTION)
        if (
            declared is None
            or not declared.request
            or (names is not None and item.name not in names)
        ):
            continue
        if declared.request_omits_default and value == item.default:
            continue
        found[item.name] = to_json_value(value)
    return found


def to_json_value(value: Any) -> Any:
    """A settings value as JSON: paths as strings, ranges and rules as their own JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    return str(value)


def settings_json(settings: Any) -> dict[str, Any]:
    """Every field of `settings` as JSON (what a file's meta records as `config`)."""
    return {f.name: to_json_value(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


# ---------------------------------------------------------------------------------------------
# Rules for single options


def at_least(least: int) -> Check:
    def check(value: Any, flag: str) -> None:
        if value < least:
            raise ConfigError(f"{flag} must be at least {least} (got {value})")

    return check


def or_more(least: int) -> Check:
    """The same rule as `at_least`, said as counts are said ("0 or more")."""

    def check(value: Any, flag: str) -> None:
        if value < least:
            raise ConfigError(f"{flag} must be {least} or more (got {value})")

    return check


def within(low: float, high: float, *, low_open: bool, high_open: bool) -> Check:
    """low < value (or ≤), value < high (or ≤); the interval written as mathematicians do."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value: Any, flag: str) -> None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below and math.isfinite(value)):
            raise ConfigError(f"{flag} must be in {shown} (got {value})")

    return check


FRACTION = within(0, 1, low_open=True, high_open=False)  # (0, 1]
