"""The one comparison of a finished removal's request with the request now."""

from __future__ import annotations

from typing import Any

from wandacli.config.declare import bookkeeping, omitted_at_default
from wandacli.core.provenance import settings_differences
from wandacli.removal.request import RemovalRequest


def stored_request(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The request a finished mask or edit was made for: `meta.request`, or what its `config`
    held apart from bookkeeping (files of earlier versions: masks kept the whole config, edits
    the request alone, a mask's model was bookkeeping)."""
    if isinstance(meta.get("request"), dict):
        return dict(meta["request"])
    config = meta.get("config")
    if not isinstance(config, dict):
        return None
    # What a removal's `config` held besides its request: where it went, what it was saved as.
    found = {k: v for k, v in config.items() if k not in bookkeeping(RemovalRequest)}
    for name, default in omitted_at_default(RemovalRequest).items():
        if name in found and found[name] == default:
            found.pop(name)  # as the request itself leaves it out
    model = found.get("model")
    if isinstance(model, dict) and set(model) != {"model", "dtype"}:
        found.pop("model")  # a mask's whole model spec: where it was saved from, not a request
    return found


def request_changes(meta: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a finished removal's request and the request now."""
    stored = stored_request(meta)
    if stored is None:
        return ["settings: not recorded (made by an older wandacli)"]
    return settings_differences(stored, current)
