"""Prompts that open alike, computed once: the shared prefix's keys and values.

In a chat template every prompt starts with the same tokens (SmolLM2's default system turn and
the user cue are 30 of its ~42 tokens on an AdvBench behaviour). A batch then runs the prefix
once, repeats its cache along the batch, and feeds only the suffixes:

    input ids       [prefix][pad … pad][suffix]      (suffixes left-padded among themselves)
    attention mask  [1 … 1 ][0 … 0    ][1 … 1 ]
    positions       each suffix token continues the prefix (P + its index among real tokens)

which is the same computation as the whole prompt, left-padded, up to float rounding. Used by
the search's measures (KL, refusal rate, refusal score), which run the same prompts once per
trial on a changed model.

Packed (`forward_logits(..., packed=True)`, the KL's passes): the suffixes are laid end to end
in a few rows, none longer than the longest suffix, instead of one row each padded to the
longest of its batch. A 4-D mask lets each token read the prefix and the tokens of its own
prompt before it, and each prompt's positions continue the prefix as above, so every prompt is
computed as alone; a batch then costs its real tokens (the utility prompts padded to their
batches' longest were a quarter more) in one pass over the weights. `packing_unsupported` says
which models cannot be run so.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


def shared_prefix_length(rows: Sequence[Sequence[int]], keep: int = 1) -> int:
    """The longest common prefix of the token rows, leaving every row at least `keep` tokens
    (the positions whose logits are read)."""
    if not rows:
        return 0
    shortest = min(len(r) for r in rows)
    length = 0
    while length < shortest - keep and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length


@dataclass
class PrefixedBatch:
    """One batch as the model reads it after the shared prefix."""

    prefix: torch.Tensor  # [1, P]
    suffix_ids: torch.Tensor  # [b, S] left-padded
    attention_mask: torch.Tensor  # [b, P + S]
    position_ids: torch.Tensor  # [b, S]

    @property
    def full_ids(self) -> torch.Tensor:
        """[b, P + S]: what `generate` is given beside the prefix cache."""
        return torch.cat([self.prefix.expand(self.suffix_ids.shape[0], -1), self.suffix_ids], 1)


def prefixed_batch(rows: Sequence[Sequence[int]], prefix_length: int, pad_id: int) -> PrefixedBatch:
    suffixes = [list(r[prefix_length:]) for r in rows]
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, suffix in enumerate(suffixes):
        ids[index, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
        suffix_mask[index, width - len(suffix) :] = 1
    prefix = torch.tensor([list(rows[0][:prefix_length])], dtype=torch.long)
    mask = torch.cat([torch.ones((len(rows), prefix_length), dtype=torch.long), suffix_mask], 1)
    positions = prefix_length + (suffix_mask.cumsum(-1) - 1).clamp_min(0)
    return PrefixedBatch(prefix, ids, mask, positions)


@dataclass
class PackedBatch:
    """One batch's suffixes laid end to end in rows after the shared prefix."""

    prefix: torch.Tensor  # [1, P]
    ids: torch.Tensor  # [R, S]: each row left-padded, its prompts one after another
    readable: torch.Tensor  # [R, 1, S, P + S] bool: the keys each query reads
    position_ids: torch.Tensor  # [R, S]
    reads: torch.Tensor  # [b * positions, 2]: (row, column) read for each prompt, in order


def packed_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in rows of at most `capacity` tokens, longest first, each into the
    first row it fits (first-fit decreasing: few rows, little padding)."""
    rows: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, load in enumerate(loads):
            if load + lengths[index] <= capacity:
                rows[row].append(index)
                loads[row] += lengths[index]
                break
        else:
            rows.append([index])
            loads.append(lengths[index])
    return rows


def packed_batch(
    rows: Sequence[Sequence[int]], prefix_length: int, pad_id: int, positions: int
) -> PackedBatch:
    suffixes = [list(r[prefix_length:]) for r in rows]
    lengths = [len(s) for s in suffixes]
    layout = packed_rows(lengths, max(lengths))
    width = max(sum(lengths[i] for i in row) for row in layout)
    ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(layout), width), dtype=torch.long)
    readable = torch.zeros((len(layout), 1, width, prefix_length + width), dtype=torch.bool)
    # A padding position reads itself only: a query that reads nothing gives NaN, which the
    # real tokens would then multiply by their zero weight for it.
    diagonal = torch.arange(width)
    readable[:, 0, diagonal, prefix_length + diagonal] = True
    reads = torch.zeros((len(rows), positions, 2), dtype=torch.long)
    for row, members in enumerate(layout):
        start = width - sum(lengths[i] for i in members)
        for index in members:
            end = start + lengths[index]
            ids[row, start:end] = torch.tensor(suffixes[index], dtype=torch.long)
            position_ids[row, start:end] = prefix_length + torch.arange(lengths[index])
            readable[row, 0, start:end, :prefix_length] = True
            readable[row, 0, start:end, prefix_length + start : prefix_length + end] = torch.tril(
                torch.ones((lengths[index], lengths[index]), dtype=torch.bool)
            )
            reads[index, :, 0] = row
            reads[index, :, 1] = torch.arange(end - positions, end)
            start = end
    prefix = torch.tensor([list(rows[0][:prefix_length])], dtype=torch.long)
    return PackedBatch(prefix, ids, readable, position_ids, reads.reshape(-1, 2))


# The attention implementations a mask of prompts laid end to end reaches as it is: a boolean
# mask (True: read) for SDPA, an additive one for the eager path. Flash attention and flex
# attention take none of either.
_PACKED_MASKS = ("sdpa", "eager")
# Layers that attend within a row and nothing else: a recurrent or linear-attention layer
# would carry one prompt's state into the next.
_PACKED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def packing_unsupported(model: Any, longest: int) -> str | None:
    """Why `model` cannot read prompts laid end to end in one row, the longest `longest` tokens
    with its prefix (None: it can). The caller checks the result on the model as well."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in _PACKED_MASKS:
        return f"its attention ({implementation}) takes no mask for prompts laid end to end"
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    text = text or model.config
    layer_types = set(getattr(text, "layer_types", None) or ())
    if layer_types - _PACKED_LAYER_TYPES:
        kinds = ", ".join(sorted(layer_types - _PACKED_LAYER_TYPES))
        return f"its layers of kind {kinds} carry state along a row"
    # One mask serves every layer: a sliding window must reach over every prompt anyway.
    window = getattr(text, "sliding_window", None)
    if window and longest > int(window):
        return f"a prompt of {longest} tokens is longer than its sliding window ({window})"
    return None


def _packed_mask(model: Any, readable: torch.Tensor) -> torch.Tensor:
    if model.config._attn_implementation == "sdpa":
        return readable
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(readable.shape, dtype=dtype).masked_fill(~readable, torch.finfo(dtype).min)


@contextlib.contextmanager
def _head_reads_only(model: Any, reads: torch.Tensor) -> Any:
    """The output head computes the read positions only: [1, n, hidden] in (row, column)
    order instead of every position of every row (the family's own forward still applies
    what follows the head, a final soft cap say)."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return

    def gather(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        rows, columns = reads[:, 0].to(hidden.device), reads[:, 1].to(hidden.device)
        return (hidden[rows, columns].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


class PassPlan(Protocol):
    """How one batch's two passes run, where not as the whole model: a recording of the layers'
    inputs, or a pass from a layer up (evaluation/lower_layers.py)."""

    def prefix(self) -> contextlib.AbstractContextManager[Any]:
        """What the prefix's pass runs under."""
        ...

    def prefix_cache(self, cache: Any) -> Any:
        """The prefix's cache as the suffixes' pass is to read it."""
        ...

    def suffix(self) -> contextlib.AbstractContextManager[Any]:
        """What the suffixes' pass runs under."""
        ...

    def prompt_cache(self, cache: Any) -> Any:
        """The cache after the suffixes' pass as generation's next steps are to read it."""
        ...


class SharedPrefixes:
    """The prefixes' keys and values one measure has computed, by the prefix's tokens: its
    batches whose prompts open alike (the chat template's opening) run that prefix once. A
    cache is the model's as its weights are now, so one lives as long as one measure of one
    trial; never beside a plan that records (it records each batch's own passes)."""

    def __init__(self) -> None:
        self._caches: dict[tuple[int, ...], Any] = {}

    def get(self, prefix: torch.Tensor) -> Any:
        """A fresh copy of the cache computed for these tokens, or None."""
        cached = self._caches.get(tuple(prefix[0].tolist()))
        return None if cached is None else copy.deepcopy(cached)

    def keep(self, prefix: torch.Tensor, cache: Any) -> None:
        self._caches[tuple(prefix[0].tolist())] = copy.deepcopy(cache)


def prefix_cache(
    model: Any,
    prefix: torch.Tensor,
    batch: int,
    device: Any,
    plan: PassPlan | None = None,
    shared: SharedPrefixes | None = None,
) -> Any:
    """The prefix's keys and values, repeated for `batch` rows (a fresh cache each call: a
    forward pass or generate appends to it); None for an empty prefix. With `shared`, a prefix
    it holds is not run again (the same tokens on the same weights: the same keys and values,
    bit for bit)."""
    if prefix.shape[1] == 0:
        return None
    from wandacli.models.pretrained import accepts_logits_to_keep, output_cache

    cache = shared.get(prefix) if shared is not None else None
    if cache is None:
        # Only the keys and values are read: the head runs on one position, not on all P.
        keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        with torch.no_grad(), plan.prefix() if plan else contextlib.nullcontext():
            cache = output_cache(model(input_ids=prefix.to(device), use_cache=True, **keep))
        if plan is not None:
            cache = plan.prefix_cache(cache)
        if shared is not None:
            shared.keep(prefix, cache)
    cache.batch_repeat_interleave(batch)
    return cache


def forward_logits(
    loaded: Any,
    rows: Sequence[Sequence[int]],
    positions: int,
    pad_id: int,
    *,
    plan: PassPlan | None = None,
    shared: SharedPrefixes | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Logits [b, positions, vocab] at the last `positions` tokens of each row, the rows'
    shared prefix computed once (once per measure with `shared`); both passes run as `plan`
    says, where one is given; `packed`: the suffixes laid end to end (see the module's text;
    only where `packing_unsupported` found no reason against it)."""
    if packed:
        return _packed_logits(loaded, rows, positions, pad_id, plan, shared)
    from wandacli.models.pretrained import accepts_logits_to_keep, cache_keyword

    model = loaded.model
    prefix_length = shared_prefix_length(rows, keep=positions)
    batch = prefixed_batch(rows, prefix_length, pad_id)
    device = loaded.input_device
    cache = prefix_cache(model, batch.prefix, len(rows), device, plan, shared)
    keep: dict[str, Any] = {"logits_to_keep": positions} if accepts_logits_to_keep(model) else {}
    if cache is not None:
        keep[cache_keyword(model)] = cache
    with torch.no_grad(), plan.suffix() if plan else contextlib.nullcontext():
        logits = model(
            input_ids=batch.suffix_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            use_cache=cache is not None,
            **keep,
        ).logits
    return logits[:, -positions:, :]


def _packed_logits(
    loaded: Any,
    rows: Sequence[Sequence[int]],
    positions: int,
    pad_id: int,
    plan: PassPlan | None,
    shared: SharedPrefixes | None,
) -> torch.Tensor:
    from wandacli.models.pretrained import cache_keyword

    model = loaded.model
    batch = packed_batch(rows, shared_prefix_length(rows, keep=positions), pad_id, positions)
    device = loaded.input_device
    cache = prefix_cache(model, batch.prefix, batch.ids.shape[0], device, plan, shared)
    extra: dict[str, Any] = {} if cache is None else {cache_keyword(model): cache}
    with (
        torch.no_grad(),
        plan.suffix() if plan else contextlib.nullcontext(),
        _head_reads_only(model, batch.reads),
    ):
        logits = model(
            input_ids=batch.ids.to(device),
            attention_mask=_packed_mask(model, batch.readable).to(device),
            position_ids=batch.position_ids.to(device),
            use_cache=cache is not None,
            **extra,
        ).logits
    if logits.shape[:2] == batch.ids.shape:  # a head the hook did not reach: every position
        logits = logits[batch.reads[:, 0], batch.reads[:, 1]]
    return logits.reshape(len(rows), positions, -1)


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded row."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
