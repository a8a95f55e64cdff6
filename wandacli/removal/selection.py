"""The modules a removal may change: `--layers`, `--modules` and `--include-routers`, declared
once here for `prune` and `search`, and one rule for every removal and search."""

from __future__ import annotations

import fnmatch
from typing import Any, Protocol

from wandacli.config.declare import option
from wandacli.core.errors import ConfigError
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.models.families import family_named
from wandacli.removal.masks import parse_layers
from wandacli.store.schema import split_key


def layers_option(panel: str) -> Any:
    return option(None, "--layers", help="Only these decoder layers, e.g. 0-3,10.", panel=panel)


def modules_option(panel: str) -> Any:
    return option(
        None,
        "--modules",
        help="Only modules matching this glob, e.g. 'mlp.*' (an expert's matrices are named "
        "mlp.experts.<e>.gate_proj, up_proj, down_proj).",
        panel=panel,
    )


def include_routers_option(panel: str) -> Any:
    # Left out of the request at False, as every removal made before routers were matrices.
    return option(
        False,
        "--include-routers",
        help="Let the removal change a mixture of experts' routers (mlp.gate, ...) too. They "
        "are scored, but left alone by default: pruning a router row changes which experts "
        "a token reaches, not what an expert computes.",
        panel=panel,
        request_omits_default=True,
    )


class ModuleFilters(Protocol):
    """What selected_keys reads: a removal's request and a search's settings both have it."""

    @property
    def layers(self) -> str | None: ...

    @property
    def modules(self) -> str | None: ...

    @property
    def include_routers(self) -> bool: ...


def selected_keys(config: ModuleFilters, fingerprint: ModelFingerprint) -> list[str]:
    """The modules `--layers` and `--modules` leave to prune (all by default), routers only
    with `--include-routers` (the model's family, as the set records it, names them)."""
    keys = list(fingerprint.shapes)
    if not config.include_routers:
        routers = set(family_named(fingerprint.family).router_keys(keys))
        keys = [k for k in keys if k not in routers]
    if config.layers:
        try:
            layers = parse_layers(config.layers, fingerprint.num_layers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        keys = [k for k in keys if split_key(k)[0] in layers]
    if config.modules:
        keys = [k for k in keys if fnmatch.fnmatchcase(split_key(k)[1], config.modules)]
        if not keys:
            names = sorted({split_key(k)[1] for k in fingerprint.shapes})
            raise ConfigError(
                f"--modules {config.modules!r} matches no module (modules: {', '.join(names)})"
            )
    return keys
