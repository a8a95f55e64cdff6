"""How far a modified model's next-token distributions moved from the dense model's: the mean
KL divergence KL(dense ‖ modified) over harmless prompts and the first k response positions.

A cheap, sensitive utility cost (heretic's, on k = 1): one forward pass per batch, no
generation for the model under test, and it moves with any change of the weights, where
perplexity on a few windows moves only with large ones.

The k positions are the prompt's last position (the first response token's distribution) and
the next k − 1, fed the dense model's own greedy continuation (teacher forcing), so that every
model is compared on the same tokens. A position after the dense continuation's end of sequence
does not count. The dense side (the continuation and its log-probabilities) is computed once and
cached in a file keyed by the model's fingerprint, its dtype, the prompts and k.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wandacli.config.evaluation import KL_POSITIONS
from wandacli.core.console import NullReporter, Reporter
from wandacli.core.durable import atomic_write_bytes
from wandacli.core.errors import ConfigError
from wandacli.evaluation import lower_layers
from wandacli.evaluation.lower_layers import RecordedStreams
from wandacli.evaluation.prefix import (
    PassPlan,
    SharedPrefixes,
    forward_logits,
    packing_unsupported,
    unpadded_rows,
)
from wandacli.models.pretrained import weights_sample_digest

KL_RULE = (
    "mean over prompts and response positions of KL(dense ‖ model) of the next-token "
    "distributions, in nats; positions 2..k read the dense model's greedy continuation"
)
_CACHE_VERSION = 5  # 5: batches packed (evaluation/prefix.py) where the model allows it


@dataclass
class DenseBatch:
    """Prompts of similar length, left-padded to the longest of them: the token ids every
    model reads (prompt, then the dense greedy continuation), and the dense log-probabilities
    at the k positions that count."""

    input_ids: torch.Tensor  # [b, L] int64
    attention_mask: torch.Tensor  # [b, L] int64
    log_probs: torch.Tensor  # [b, k, vocab] float32
    valid: torch.Tensor  # [b, k] bool: the position is before the continuation's end


@dataclass
class DenseDistributions:
    """The dense model's side of the comparison, in batches of prompts sorted by length (a
    long prompt would otherwise make every prompt of its batch as long: 3× the work on the
    utility set)."""

    batches: list[DenseBatch]
    key: str  # what the cache file is keyed by (sha256)
    # Whether every pass lays its prompts end to end (evaluation/prefix.py), and why not.
    packed: bool = False
    why_not_packed: str = ""

    @property
    def positions(self) -> int:
        return int(self.batches[0].log_probs.shape[1])

    @property
    def prompts(self) -> int:
        return sum(int(b.log_probs.shape[0]) for b in self.batches)

    @property
    def longest(self) -> int:
        """The longest row's tokens: a prompt and its continuation."""
        return max(int(b.attention_mask.sum(-1).max()) for b in self.batches)

    @property
    def counted_positions(self) -> int:
        return sum(int(b.valid.sum()) for b in self.batches)


def cache_key(loaded: Any, texts: Sequence[str], positions: int, add_special_tokens: bool) -> str:
    """sha256 of everything the dense distributions depend on."""
    content = {
        "version": _CACHE_VERSION,
        "model": loaded.fingerprint.digest,
        "weights": weights_sample_digest(loaded),
        "model_id": str(loaded.model_id),
        "dtype": str(loaded.dtype),
        "positions": positions,
        "add_special_tokens": add_special_tokens,
        "texts": hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest(),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def dense_distributions(
    loaded: Any,
    texts: Sequence[str],
    *,
    positions: int = KL_POSITIONS,
    add_special_tokens: bool = False,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> DenseDistributions:
    """The dense model's continuation and log-probabilities, read from `cache_dir` when a file
    with the same key is there, else computed (on `loaded` as it is now: call this before a
    mask or edit is applied) and written there."""
    key = cache_key(loaded, texts, positions, add_special_tokens)
    path = cache_dir / f"kl-dense-{key[:16]}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    dense = _compute_dense(loaded, texts, positions, add_special_tokens, batch_size, key, reporter)
    if path is not None:
        _write_cache(path, dense)
    return dense


def kl_divergence(
    loaded: Any,
    dense: DenseDistributions,
    *,
    reporter: Reporter | None = None,
    streams: RecordedStreams | None = None,
    unchanged_below: int = 0,
) -> float:
    """Mean KL(dense ‖ model) in nats over the valid (prompt, position) pairs. With `streams`
    (recorded on the dense model for these batches) and a model whose embedding and layers
    below `unchanged_below` are the dense model's, each pass starts at the highest recorded
    layer there (evaluation/lower_layers.py)."""
    reporter = reporter or NullReporter()
    plans = streams.plans(loaded.model, unchanged_below) if streams is not None else None
    # The model measured may be another than the dense one (`eval-utility --kl-reference`):
    # it reads packed batches only where it can too (its padded pass is the same computation).
    packed = dense.packed and (
        streams is not None or packing_unsupported(loaded.model, dense.longest) is None
    )
    shared = SharedPrefixes()  # the batches' common opening, run once on these weights
    total = 0.0
    counted = 0
    reporter.start("KL: prompts", total=dense.prompts)
    for index, batch in enumerate(dense.batches):
        log_probs = _position_log_probs(
            loaded,
            batch.input_ids,
            batch.attention_mask,
            dense.positions,
            plan=plans[index] if plans is not None else None,
            shared=shared,
            packed=packed,
        )
        reference = batch.log_probs
        if log_probs.shape[-1] != reference.shape[-1]:
            raise ConfigError(
                f"the model's output has {log_probs.shape[-1]} tokens, the dense model's "
                f"{reference.shape[-1]}: the KL compares distributions over one vocabulary"
            )
        per_position = _kl_per_position(reference, log_probs)
        total += float(per_position[batch.valid].sum())
        counted += int(batch.valid.sum())
        reporter.advance(int(batch.input_ids.shape[0]))
    reporter.finish()
    # Rounding can leave a hair below zero where the distributions are equal.
    return max(total / counted, 0.0) if counted else 0.0


def _kl_per_position(reference: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) at each position, from log-probabilities over the last dim:
    Σ_v p (log p − log q) in float64, the sum over 50k tokens of small differences."""
    return (reference.exp().double() * (reference.double() - log_probs.double())).sum(-1)


def describe_layout(dense: DenseDistributions) -> str:
    """One line for the log: how the KL's batches are laid out."""
    if dense.packed:
        return "KL: each batch's prompts laid end to end, no padding (evaluation/prefix.py)"
    return f"KL: each batch padded to its longest prompt ({dense.why_not_packed})"


def recorded_streams(loaded: Any, dense: DenseDistributions) -> RecordedStreams:
    """The dense model's streams entering its layers on the KL's batches (call this before a
    mask or edit is applied), for `kl_divergence(..., streams=)`."""
    batches = [unpadded_rows(batch.input_ids, batch.attention_mask) for batch in dense.batches]
    return lower_layers.record_streams(loaded, batches, dense.positions, packed=dense.packed)


# ---------------------------------------------------------------------------------------------


def _compute_dense(
    loaded: Any,
    texts: Sequence[str],
    positions: int,
    add_special_tokens: bool,
    batch_size: int,
    key: str,
    reporter: Reporter | None,
) -> DenseDistributions:
    if positions < 1:
        raise ValueError("positions must be 1 or more")
    reporter = reporter or NullReporter()
    tokenizer = loaded.tokenizer
    encoded = [
        tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] for text in texts
    ]
    by_length = [encoded[i] for i in sorted(range(len(texts)), key=lambda i: len(encoded[i]))]
    why_not = (
        packing_unsupported(loaded.model, len(by_length[-1]) + positions - 1)
        if by_length
        else "no prompts"
    )
    if why_not is None:
        batches = _dense_batches(loaded, by_length, positions, batch_size, True, reporter)
        why_not = _packing_differs(loaded, batches[0], positions)
        if why_not is None:
            return DenseDistributions(batches, key, packed=True)
    batches = _dense_batches(loaded, by_length, positions, batch_size, False, reporter)
    return DenseDistributions(batches, key, packed=False, why_not_packed=why_not)


def _dense_batches(
    loaded: Any,
    by_length: list[list[int]],
    positions: int,
    batch_size: int,
    packed: bool,
    reporter: Reporter,
) -> list[DenseBatch]:
    batches = []
    reporter.start("KL: the dense model's distributions", total=len(by_length))
    # Packed, a batch costs its real tokens whatever their lengths: batch_size prompts each.
    for chosen in _length_batches([len(r) for r in by_length], batch_size, padding=not packed):
        rows = [by_length[i] for i in chosen]
        input_ids, attention_mask = _left_padded(rows, loaded.tokenizer.pad_token_id)
        valid = torch.ones((len(rows), positions), dtype=torch.bool)
        if positions > 1:
            input_ids, attention_mask, valid = _greedy_continuation(
                loaded, input_ids, attention_mask, positions - 1
            )
        log_probs = _position_log_probs(loaded, input_ids, attention_mask, positions, packed=packed)
        batches.append(DenseBatch(input_ids, attention_mask, log_probs, valid))
        reporter.advance(len(rows))
    reporter.finish()
    return batches


def _packing_differs(loaded: Any, batch: DenseBatch, positions: int) -> str | None:
    """Why the packed pass is not the padded one on this batch (None: it is, up to the
    rounding of the model's dtype): a model that lets one prompt see another fails here."""
    padded = _position_log_probs(loaded, batch.input_ids, batch.attention_mask, positions)
    # KL(padded ‖ packed) in nats a position, within one epsilon of the dtype (float32 1e-7,
    # bfloat16 8e-3; the organism's packed and padded bfloat16 passes differ by 2e-3).
    moved = float(_kl_per_position(padded, batch.log_probs).mean())
    allowed = torch.finfo(loaded.model.get_input_embeddings().weight.dtype).eps
    if moved > allowed:
        return f"the packed pass moved the dense distributions by {moved:.3g} nats"
    return None


# Padding a batch may add, as a share of its real tokens: long prompts go in batches of their
# own (the utility set's longest is 7× its median) instead of making a whole batch as long.
PADDING_ALLOWED = 0.25


def _length_batches(lengths: list[int], batch_size: int, padding: bool = True) -> list[list[int]]:
    """Consecutive indices of length-sorted prompts: at most `batch_size` prompts a batch, and
    (`padding`: the batch is padded to its longest) a new batch where the next prompt would pad
    the batch beyond PADDING_ALLOWED."""
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index, length in enumerate(lengths):
        padded = (len(current) + 1) * length
        if current and (
            len(current) == batch_size
            or (padding and padded > (1 + PADDING_ALLOWED) * (real + length))
        ):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += length
    if current:
        batches.append(current)
    return batches


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(row)
            mask[index, width - len(row) :] = 1
    return ids, mask


def _greedy_continuation(
    loaded: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts followed by the dense model's first `tokens` greedy tokens, and which of
    the k = tokens + 1 positions come before the continuation's end of sequence."""
    from transformers import GenerationConfig

    from wandacli.models.pretrained import end_of_sequence_ids

    model, tokenizer = loaded.model, loaded.tokenizer
    eos_ids = set(end_of_sequence_ids(loaded))
    config = GenerationConfig(
        max_new_tokens=tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,  # every row the same length; positions after an EOS are masked
    )
    with torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids.to(loaded.input_device),
            attention_mask=attention_mask.to(loaded.input_device),
            generation_config=config,
        ).cpu()
    continuation = sequences[:, input_ids.shape[1] :]
    short = tokens - continuation.shape[1]
    if short > 0:
        # generate stops early when every row has ended, whatever eos_token_id says (the
        # model's own generation config supplies one): pad, and those positions do not count.
        padding = torch.full((sequences.shape[0], short), tokenizer.pad_token_id, dtype=torch.long)
        continuation = torch.cat([continuation, padding], dim=1)
        sequences = torch.cat([sequences, padding], dim=1)
    ended = torch.tensor([[int(t) in eos_ids for t in row] for row in continuation.tolist()])
    if short > 0:
        ended[:, tokens - short :] = True
    # Position j (0-based) counts when none of the first j continuation tokens ended the text.
    ended_before = torch.cat(
        [torch.zeros((sequences.shape[0], 1), dtype=torch.bool), ended.cumsum(1).gt(0)], dim=1
    )
    full_mask = torch.cat([attention_mask, torch.ones_like(continuation)], dim=1)
    return sequences, full_mask, ~ended_before


def _position_log_probs(
    loaded: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: int,
    plan: PassPlan | None = None,
    shared: SharedPrefixes | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Log-probabilities [b, k, vocab] float32 at the last k positions, on the CPU (the
    batch's shared prefix, the chat template's opening, computed once; `packed`: its prompts
    laid end to end: evaluation/prefix.py)."""
    rows = unpadded_rows(input_ids, attention_mask)
    pad_id = int(loaded.tokenizer.pad_token_id)
    logits = forward_logits(
        loaded, rows, positions, pad_id, plan=plan, shared=shared, packed=packed
    )
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _write_cache(path: Path, dense: DenseDistributions) -> None:
    import io

    arrays: dict[str, Any] = {
        "key": np.array(dense.key),
        "packed": np.array(dense.packed),
        "why_not_packed": np.array(dense.why_not_packed),
    }
    for index, batch in enumerate(dense.batches):
        arrays[f"input_ids_{index}"] = batch.input_ids.numpy()
        arrays[f"attention_mask_{index}"] = batch.attention_mask.numpy()
        arrays[f"log_probs_{index}"] = batch.log_probs.numpy()
        arrays[f"valid_{index}"] = batch.valid.numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def _read_cache(path: Path, key: str) -> DenseDistributions | None:
    """The cached distributions, or None when the file is unreadable or for another key (it is
    then recomputed and replaced)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            batches = []
            index = 0
            while f"input_ids_{index}" in data:
                batches.append(
                    DenseBatch(
                        *(
                            torch.from_numpy(data[f"{name}_{index}"])
                            for name in ("input_ids", "attention_mask", "log_probs", "valid")
                        )
                    )
                )
                index += 1
            if not batches:
                return None
            return DenseDistributions(
                batches, key, bool(data["packed"]), str(data["why_not_packed"])
            )
    except (OSError, ValueError, KeyError):
        return None
