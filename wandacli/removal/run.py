"""`wandacli prune`: a removal of the kind the request names, computed from the stored sets and
written into the store (masks/ or edits/), optionally applied to a saved model."""

from __future__ import annotations

from typing import Any

from wandacli.removal.edits import run_edit
from wandacli.removal.prune import run_prune
from wandacli.removal.request import RemovalRequest, removal_request
from wandacli.removal.results import EditResult, PruneResult


def run_removal(request: RemovalRequest, **context: Any) -> PruneResult | EditResult:
    """The request's mask or edit, written (`context`: reporter, command_line)."""
    if request.family == "mask":
        return run_prune(request, **context)
    return run_edit(request, **context)


def prune(options: dict[str, Any], **context: Any) -> PruneResult | EditResult:
    """What `prune` does with flat option values (as the command line gives them), for
    library callers: `prune({"scores": "wanda", "sparsity_ratio": 0.5})`."""
    return run_removal(removal_request(options), **context)
