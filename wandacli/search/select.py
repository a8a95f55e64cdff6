"""`search --select reference`: the refusal-direction reference's own choice of (layer,
position) (andyrdt/refusal_direction, `select_direction.py`), reproduced on the stored means.

For every candidate r[l, p] = μ_harmful[l, p] − μ_harmless[l, p] in the ranges:

    kl       KL(dense ‖ ablated) of the last prompt position's next-token distribution on the
             harmless prompts (--kl-prompts), r̂ removed as `prune --direction-layer` removes it
    bypass   the refusal score (log-odds of the refusal tokens at the first response position)
             on the harmful prompts (--prompts), r̂ removed
    induce   the refusal score on the harmless prompts with r (not normalised) added to the
             residual stream at layer l, every position (activation addition)

discarded when l is in the last 20% of the layers, kl > 0.1 or induce < 0; the chosen candidate
is the lowest bypass among the rest. wandacli's refusal score is the reference's with its own
refusal tokens (evaluation/refusal.py); the prompts are the search's, not the reference's
validation split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from wandacli.core.console import NullReporter, Reporter, info, warn
from wandacli.core.errors import interruptible
from wandacli.core.provenance import now_iso
from wandacli.evaluation.divergence import DenseDistributions, kl_divergence
from wandacli.evaluation.refusal import refusal_score
from wandacli.removal.in_memory import WeightChanges
from wandacli.search.config import best_name
from wandacli.search.removals import TrialRemovals

# The reference's filters (select_direction.py's defaults).
PRUNE_LAYER_SHARE = 0.2
KL_THRESHOLD = 0.1
INDUCE_THRESHOLD = 0.0
RULE = (
    "the refusal-direction reference's selection: discard layers in the last 20%, KL of the "
    "last position's distribution > 0.1 under ablation, or an induced refusal score < 0 under "
    "activation addition; the lowest bypass refusal score under ablation among the rest"
)


@contextmanager
def activation_added(loaded: Any, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """x ← x + vector at the input of decoder layer `layer` (hidden_states[layer]), every
    position, for the duration of the block."""
    from wandacli.models.layers import decoder_layers

    block = decoder_layers(loaded.model)[layer]

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        added = hidden + vector.to(device=hidden.device, dtype=hidden.dtype)
        if args:
            return (added, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": added}

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def select_reference(
    loaded: Any,
    removals: TrialRemovals,
    candidates: Sequence[dict[str, int]],
    *,
    harmful_texts: Sequence[str],
    harmless_texts: Sequence[str],
    special: bool,
    dense_last: DenseDistributions,
    batch_size: int,
    reporter: Reporter | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    earlier: Mapping[tuple[int, int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every candidate's three scores and why it was discarded, and the chosen one. `earlier`:
    candidates an interrupted run scored already, by (layer, position), taken as they are;
    `progress` sees every candidate's entry as soon as it is known."""
    reporter = reporter or NullReporter()
    earlier = earlier or {}
    layers = loaded.fingerprint.num_layers
    first_pruned = int(layers * (1.0 - PRUNE_LAYER_SHARE))
    harmful_means, harmless_means = removals.means
    scored: list[dict[str, Any]] = []
    reporter.start("select: candidates", total=len(candidates))
    for params in candidates:
        layer, position = params["direction_layer"], params["direction_position"]
        entry = earlier.get((layer, position))
        if entry is None:
            entry = {"params": dict(params)}
            r = removals.direction(params)
            if r is None:
                entry["discarded"] = "no direction (the two means are equal here)"
            else:
                with WeightChanges(loaded) as changes:
                    removals.apply(params, changes)
                    entry["kl"] = kl_divergence(loaded, dense_last)
                    entry["bypass"] = refusal_score(
                        loaded, harmful_texts, add_special_tokens=special, batch_size=batch_size
                    )
                if layer < layers:  # hidden_states[L] is after the final norm: no block there
                    index = harmful_means.shape[1] + position
                    raw = harmful_means[layer, index] - harmless_means[layer, index]
                    with activation_added(loaded, layer, torch.from_numpy(raw)):
                        entry["induce"] = refusal_score(
                            loaded,
                            harmless_texts,
                            add_special_tokens=special,
                            batch_size=batch_size,
                        )
                if layer >= first_pruned:
                    entry["discarded"] = f"layer {layer} is in the last 20% (≥ {first_pruned})"
                elif entry["kl"] > KL_THRESHOLD:
                    entry["discarded"] = f"KL {entry['kl']:.3g} > {KL_THRESHOLD}"
                elif entry.get("induce", -1.0) < INDUCE_THRESHOLD:
                    entry["discarded"] = f"induce {entry.get('induce', float('nan')):.3g} < 0"
        scored.append(entry)
        if progress is not None:
            progress(entry)
        reporter.advance()
    reporter.finish()
    kept = [e for e in scored if "discarded" not in e]
    chosen = (
        min(kept, key=lambda e: (e["bypass"], e["params"]["direction_layer"])) if kept else None
    )
    return {"rule": RULE, "candidates": scored, "chosen": chosen}


def run_selection(
    run: Any,
    removals: TrialRemovals,
    loaded: Any,
    objectives: Any,
    summary: Any,
    summary_path: Any,
) -> dict[str, Any] | None:
    """`search --select reference`: every candidate scored as the reference scores it, the
    chosen one kept as `<name>.best` by the search `run` (no Optuna study: the reference looks
    at every candidate). Resumable as the trials are: each candidate's scores are written as
    soon as they are known, and a rerun of the same request takes those an interrupted run
    left. Returns the kept point, or None when every candidate was discarded."""
    from itertools import product

    config = run.config
    ranges = config.searched()
    layers, positions = ranges["direction_layer"], ranges["direction_position"]
    candidates = [
        {"direction_layer": layer, "direction_position": position}
        for layer, position in product(
            range(int(layers.low), int(layers.high) + 1),
            range(int(positions.low), int(positions.high) + 1),
        )
    ]
    dense_last = objectives.dense(objectives.kl_texts, 1, objectives.special)
    earlier = {
        (e["params"]["direction_layer"], e["params"]["direction_position"]): e
        for e in (summary.selection or {}).get("candidates", [])
    }
    summary.write(summary_path)
    partial: list[dict[str, Any]] = []

    def keep_candidate(entry: dict[str, Any]) -> None:
        partial.append(entry)
        summary.selection = {"rule": RULE, "candidates": partial, "chosen": None}
        summary.other["updated"] = now_iso()
        summary.write(summary_path)

    kept_message = f"the candidates scored are kept in {summary_path}; the same command resumes"
    with interruptible(lambda: kept_message):
        selection = select_reference(
            loaded,
            removals,
            candidates,
            harmful_texts=objectives.refusal_texts,
            harmless_texts=objectives.kl_texts,
            special=objectives.special,
            dense_last=dense_last,
            batch_size=config.batch_size,
            reporter=run.reporter,
            progress=keep_candidate,
            earlier=earlier,
        )
    summary.selection = selection
    chosen = selection["chosen"]
    best = None
    if chosen is not None:
        point = {
            "index": candidates.index(chosen["params"]),
            "params": chosen["params"],
            "refusal": chosen["bypass"],
            "kl": chosen["kl"],
        }
        name = best_name(config.name)
        moved = (summary.best or {}).get("index") != point["index"]
        run.write_point(
            point, name, summary_path.parent, summary, overwrite=moved, rule="reference"
        )
        best = {"name": name, "index": point["index"], "rule": "reference", "within_limit": True}
        summary.best = best
        info(f"the reference's selection: {chosen['params']} kept as {name}")
    else:
        warn("every candidate was discarded by the reference's filters: nothing kept")
    summary.other["updated"] = now_iso()
    summary.write(summary_path)
    return best
