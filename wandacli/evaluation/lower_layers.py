"""A change that leaves the lower decoder layers as they were: its forward pass starts above them.

The search measures the KL on the same harmless prompts once per trial. A direction kernel
that peaks at layer 23 and reaches 9 layers down changes nothing below layer 14, and leaves the
embedding alone (heretic never edits it): the residual stream entering layer 14 is then the
dense model's, on every trial. So it is recorded once, on the dense model, and a trial's forward
pass runs from the first changed layer up:

    embedding → layers 0 … k−1 (each returns its input: no work) → the dense stream replaces
    the input of layer k → layers k … L−1 → the final norm and the head

Both passes of a batch (evaluation/prefix.py: the shared prefix, then the suffixes reading its
keys and values) start at k; the prefix's cache below k is the dense prefix's, recorded with
the streams. The attention masks and the rotary position embeddings are still made by the
model's own forward pass, so the layers from k on compute what they compute in the whole pass,
on the same inputs: the KL is the whole pass's, bit for bit on the CPU. Whether a family's
layers can be run so is checked on the dense model before any trial (`record_streams`): a
family whose layers share state across the stack (a key/value cache one layer fills and another
reads) fails the check, which says why, and is measured by the whole pass.

The refusal rate's generation runs its prompts' pass the same way (evaluation/refusal.py): the
dense prompts' keys and values are recorded too, and after the pass from layer k the layers
below it get the dense ones, which the generated tokens' steps (every layer: those tokens are
the trial's own) then read.

The stream of every layer is kept on the CPU while it fits `STREAM_BUDGET_BYTES`; beyond it,
every m-th layer's (a trial then starts at the nearest recorded layer below its first change).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# The recorded streams' memory, on the CPU: every layer's on the demo's organism (about 120 MB
# for the 32 KL prompts), every m-th layer's on a 70B model.
STREAM_BUDGET_BYTES = 2 * 1024**3

# How close the pass from a middle layer must come to the whole pass on the dense model, as a
# share of the largest logit: float rounding on a GPU's reordered sums, not a missing step.
CHECK_TOLERANCE = 1e-3


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _returns_input(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A layer below the first changed one: its output is replaced at layer k anyway."""
    return _hidden_input(args, kwargs)


@contextlib.contextmanager
def recording(layers: Any, wanted: list[int], into: dict[int, torch.Tensor]) -> Iterator[None]:
    """Each wanted layer's input stream, copied to the CPU, into `into` (one forward pass)."""

    def hook(index: int) -> Callable[..., None]:
        def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            into[index] = _hidden_input(args, kwargs).detach().to("cpu", copy=True)

        return record

    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in wanted]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def starting_at(layers: Any, start: int, stream: torch.Tensor) -> Iterator[None]:
    """One forward pass from layer `start`: the layers below return their input, and `stream`
    (the dense model's input of layer `start`) replaces what reaches it."""

    def replace(
        _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = _hidden_input(args, kwargs)
        dense = stream.to(device=hidden.device, dtype=hidden.dtype)
        if args:
            return (dense, *args[1:]), kwargs
        return args, kwargs | {"hidden_states": dense}

    # An instance's `forward` (accelerate's device hooks put theirs there) is put back as it was.
    saved = [layer.__dict__.get("forward") for layer in layers[:start]]
    handle = layers[start].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        for layer in layers[:start]:
            layer.forward = _returns_input
        yield
    finally:
        handle.remove()
        for layer, forward in zip(layers[:start], saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@dataclass
class BatchStreams:
    """One batch's dense streams entering the recorded layers, for its prefix's pass and its
    suffixes' pass, and the dense prefix's keys and values (the lower layers' part of it is
    what a pass from a layer up reuses: those layers are the dense model's); for generation,
    also the whole prompts' keys and values (`prompt_cache`), which the steps after the
    prompts' pass read. The caches stay where the model is (on its GPUs): as much memory as
    the batch's own keys and values while it generates."""

    prefix: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix_cache: Any = None
    suffix: dict[int, torch.Tensor] = field(default_factory=dict)
    prompt_cache: Any = None


class Recording:
    """A `PassPlan` (evaluation/prefix.py) that records a batch's streams as it runs;
    `keep_cache`: also the prompts' keys and values once both passes ran."""

    def __init__(self, layers: Any, wanted: list[int], keep_cache: bool = False) -> None:
        self.layers = layers
        self.wanted = wanted
        self.keep_cache = keep_cache
        self.streams = BatchStreams()

    def prefix(self) -> contextlib.AbstractContextManager[None]:
        return recording(self.layers, self.wanted, self.streams.prefix)

    def prefix_cache(self, cache: Any) -> Any:
        self.streams.prefix_cache = copy.deepcopy(cache)
        if self.keep_cache:
            # The suffixes' pass appends to this very cache: once it ran, it holds the whole
            # prompts' keys and values (no one else reads it after that pass).
            self.streams.prompt_cache = cache
        return cache

    def suffix(self) -> contextlib.AbstractContextManager[None]:
        return recording(self.layers, self.wanted, self.streams.suffix)

    def prompt_cache(self, cache: Any) -> Any:
        return cache


class StartingAt:
    """A `PassPlan` that runs both passes of a batch from layer `start`, reading its recorded
    dense streams, the prefix's lower layers' keys and values the dense ones."""

    def __init__(self, layers: Any, start: int, streams: BatchStreams) -> None:
        self.layers = layers
        self.start = start
        self.streams = streams

    def prefix(self) -> contextlib.AbstractContextManager[None]:
        return starting_at(self.layers, self.start, self.streams.prefix[self.start])

    def prefix_cache(self, cache: Any) -> Any:
        # The layers below `start` did not run: their part of the cache is the dense prefix's
        # (a cache keeps one object per layer from transformers 4.56 on, the floor).
        for index in range(self.start):
            cache.layers[index] = copy.deepcopy(self.streams.prefix_cache.layers[index])
        return cache

    def suffix(self) -> contextlib.AbstractContextManager[None]:
        return starting_at(self.layers, self.start, self.streams.suffix[self.start])

    def prompt_cache(self, cache: Any) -> Any:
        # The suffixes' pass left the layers below `start` with the prefix's keys and values:
        # the steps that follow read the whole prompts' there, the dense model's.
        for index in range(self.start):
            cache.layers[index] = copy.deepcopy(self.streams.prompt_cache.layers[index])
        return cache


@dataclass
class RecordedStreams:
    """The dense model's streams for each batch of one set of prompts (in the order the
    batches run), at the recorded layers."""

    layers: list[int]  # recorded layer indices, ascending, each ≥ 1
    layer_count: int = 0  # the model's
    batches: list[BatchStreams] = field(default_factory=list)
    usable: bool = True
    why_not: str = ""

    def start_for(self, unchanged_below: int) -> int | None:
        """The layer a pass starts at when nothing below `unchanged_below` (nor the embedding)
        changed: the highest recorded layer at or below it; None for the whole pass."""
        if not self.usable:
            return None
        candidates = [layer for layer in self.layers if layer <= unchanged_below]
        return candidates[-1] if candidates else None

    def plan(self, layers: Any, batch: int, start: int | None) -> StartingAt | None:
        """How batch `batch` runs from `start` (None: the whole pass)."""
        return None if start is None else StartingAt(layers, start, self.batches[batch])

    def plans(self, model: Any, unchanged_below: int) -> list[StartingAt] | None:
        """How each batch runs on `model`, whose embedding and layers below `unchanged_below`
        are the dense model's: from the highest recorded layer there (None: the whole pass)."""
        from wandacli.models.layers import decoder_layers

        start = self.start_for(unchanged_below)
        if start is None:
            return None
        layers = decoder_layers(model)
        return [StartingAt(layers, start, batch) for batch in self.batches]


def layers_to_record(layer_count: int, bytes_per_layer: int, budget: int) -> list[int]:
    """Layers 1 … L−1, or every m-th of them where all would exceed `budget` bytes."""
    every = list(range(1, layer_count))
    if not every or bytes_per_layer * len(every) <= budget:
        return every
    fitting = max(1, budget // max(bytes_per_layer, 1))
    step = -(-len(every) // fitting)  # ceil: at most `fitting` layers
    return every[::step]


def record_streams(
    loaded: Any,
    batches: list[list[list[int]]],
    positions: int,
    *,
    keep_caches: bool = False,
    budget: int = STREAM_BUDGET_BYTES,
    packed: bool = False,
) -> RecordedStreams:
    """The dense model's streams entering each recorded layer for each batch of token rows,
    run as the KL runs it (`keep_caches`: and the prompts' keys and values, for generation;
    `packed`: each batch's prompts laid end to end, evaluation/prefix.py); then checked: the
    passes from a middle layer and from the last recorded one must give the whole pass's
    logits on the first batch."""
    from wandacli.evaluation.prefix import forward_logits
    from wandacli.models.layers import decoder_layers

    layers = decoder_layers(loaded.model)
    embedding = loaded.model.get_input_embeddings().weight
    tokens = sum(len(row) for rows in batches for row in rows)
    per_layer = tokens * int(embedding.shape[-1]) * embedding.element_size()
    wanted = layers_to_record(len(layers), per_layer, budget)
    if not wanted:
        return unusable("the model has one decoder layer")
    if not batches:
        return unusable("no prompts")
    recorded = RecordedStreams(wanted, len(layers))
    pad_id = int(loaded.tokenizer.pad_token_id)
    whole = None
    for rows in batches:
        plan = Recording(layers, wanted, keep_cache=keep_caches)
        logits = forward_logits(loaded, rows, positions, pad_id, plan=plan, packed=packed)
        whole = logits.float() if whole is None else whole
        if keep_caches and plan.streams.prompt_cache is None:
            return unusable("a batch's prompts share no opening, so no keys and values are kept")
        recorded.batches.append(plan.streams)
    assert whole is not None
    first_rows = batches[0]
    for start in sorted({wanted[len(wanted) // 2], wanted[-1]}):
        try:
            shortcut = forward_logits(
                loaded,
                first_rows,
                positions,
                pad_id,
                plan=recorded.plan(layers, 0, start),
                packed=packed,
            ).float()
        # A family whose layers cannot be skipped fails in its own way (a layer returning a
        # tuple, a cache another layer fills): each means the whole pass.
        except Exception as exc:  # noqa: BLE001
            return unusable(f"the pass from layer {start} failed ({type(exc).__name__})")
        difference = float((shortcut - whole).abs().max())
        if difference > CHECK_TOLERANCE * float(whole.abs().max()):
            return unusable(f"the pass from layer {start} moved the logits by {difference:.3g}")
    return recorded


def unusable(why: str) -> RecordedStreams:
    """Streams that are never used: each trial measured by the whole pass, for `why`."""
    return RecordedStreams([], usable=False, why_not=why)


def describe(streams: RecordedStreams, measure: str = "KL") -> str:
    """One line for the log: how a trial's `measure` runs."""
    if not streams.usable:
        return f"{measure}: the whole pass on every trial ({streams.why_not})"
    return (
        f"{measure}: each trial's pass starts at its first changed layer (the dense stream "
        f"into {len(streams.layers)} of the {streams.layer_count} layers recorded)"
    )
