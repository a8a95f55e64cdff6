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
) -> torch.Tensor:
    """Logits [b, positions, vocab] at the last `positions` tokens of each row, the rows'
    shared prefix computed once (once per measure with `shared`); both passes run as `plan`
    says, where one is given."""
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


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded row."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
