"""The modules a removal may change: `--layers` and `--modules`, one rule for every removal and search."""

from __future__ import annotations

import fnmatch
from typing import Protocol

from wandacli.core.errors import ConfigError
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.removal.masks import parse_layers
from wandacli.store.schema import split_key


class ModuleFilters(Protocol):
    """What selected_keys reads: a removal's request and a search's settings both have it."""

    @property
    def layers(self) -> str | None: ...

    @property
    def modules(self) -> str | None: ...


def selected_keys(config: ModuleFilters, fingerprint: ModelFingerprint) -> list[str]:
    """The modules `--layers` and `--modules` leave to prune (all by default)."""
    keys = list(fingerprint.shapes)
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
