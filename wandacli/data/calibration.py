"""Calibration samples: templates, prompt masking and the seeded draw."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wandacli.core.console import warn
from wandacli.core.errors import DataError
from wandacli.data.sources import RawData
from wandacli.data.templates import apply_chat_template, build_prompt, strip_llama2_tags

if TYPE_CHECKING:
    import torch

# Labels at positions that must not count (prompt tokens), as in Hugging Face losses.
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Calibration samples


@dataclass(frozen=True)
class CalibrationSample:
    """One sample: token ids and labels, both [1, T]; labels are IGNORE_INDEX where a token
    does not count (prompt tokens in disentangled mode)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def counted(self) -> torch.Tensor:
        """Boolean [1, T]: the positions whose activations and loss count."""
        return self.labels.ne(IGNORE_INDEX)

    @property
    def num_counted(self) -> int:
        return int(self.counted.sum())


@dataclass
class CalibrationSet:
    """Tokenised calibration samples and how they were chosen."""

    name: str
    source: str
    content_hash: str
    samples: list[CalibrationSample]
    indices: list[int]  # rows (disentangled) or window starts in tokens (entangled)
    disentangle: bool
    seqlen: int
    template: str
    truncated: int = 0  # samples cut at seqlen


def select_rows(num_rows: int, nsamples: int, seed: int) -> list[int]:
    """The reference's choice of rows: `Dataset.shuffle(seed).select(range(nsamples))`, i.e. the
    first nsamples of numpy's default_rng(seed) permutation."""
    permutation = np.random.default_rng(seed).permutation(num_rows)
    return [int(i) for i in permutation[:nsamples]]


def select_windows(num_tokens: int, nsamples: int, seed: int, seqlen: int) -> list[int]:
    """The reference's entangled windows: Python `random` seeded with the seed, one
    `randint(0, num_tokens - seqlen - 1)` per sample."""
    rng = random.Random(seed)
    return [rng.randint(0, num_tokens - seqlen - 1) for _ in range(nsamples)]


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def build_calibration_set(
    raw: RawData,
    tokenizer: Any,
    *,
    nsamples: int,
    seed: int,
    seqlen: int,
    disentangle: bool = True,
    template: str = "raw",
) -> CalibrationSet:
    """Choose and tokenise calibration samples exactly as the reference does (see REFERENCE.md),
    except that the response is encoded without special tokens instead of dropping its first
    token, which is only a BOS for tokenizers that add one."""
    if nsamples <= 0:
        raise DataError(f"--nsamples must be at least 1 (got {nsamples})")
    if seqlen <= 0:
        raise DataError(f"--seqlen must be positive (got {seqlen})")
    if template not in ("raw", "chat"):
        raise DataError(f"unknown --template {template!r}: use raw or chat")
    if disentangle and raw.kind == "text":
        disentangle = False  # plain text has no prompt/response split: every token counts
    if disentangle:
        return _disentangled(raw, tokenizer, nsamples, seed, seqlen, template)
    return _entangled(raw, tokenizer, nsamples, seed, seqlen, template)


def _disentangled(
    raw: RawData, tokenizer: Any, nsamples: int, seed: int, seqlen: int, template: str
) -> CalibrationSet:
    import torch

    if nsamples > len(raw.pairs):
        raise DataError(
            f"--nsamples {nsamples} but {raw.name} has only {len(raw.pairs)} rows: "
            f"use --nsamples {len(raw.pairs)} or fewer"
        )
    indices = select_rows(len(raw.pairs), nsamples, seed)
    samples: list[CalibrationSample] = []
    truncated = empty = 0
    for index in indices:
        pair = raw.pairs[index]
        if template == "chat":
            system, user = strip_llama2_tags(pair.prompt)
            prompt_ids = _encode(
                tokenizer, apply_chat_template(tokenizer, user, system), special=False
            )
            response_ids = _encode(tokenizer, pair.response.lstrip(), special=False)
        else:
            prompt_ids = _encode(tokenizer, pair.prompt, special=True)
            response_ids = _encode(tokenizer, pair.response, special=False)
        ids = prompt_ids + response_ids
        if len(ids) > seqlen:
            ids = ids[:seqlen]
            truncated += 1
        input_ids = torch.tensor([ids], dtype=torch.long)
        labels = input_ids.clone()
        labels[:, : len(prompt_ids)] = IGNORE_INDEX
        sample = CalibrationSample(input_ids, labels)
        if sample.num_counted == 0:
            empty += 1
        samples.append(sample)
    if truncated:
        warn(f"{truncated} of {nsamples} samples were longer than --seqlen {seqlen} and were cut")
    if empty:
        counted = "1 sample has" if empty == 1 else f"{empty} samples have"
        warn(f"{counted} no response tokens left (prompt ≥ --seqlen); they count for nothing")
    return CalibrationSet(
        raw.name, raw.source, raw.content_hash, samples, indices, True, seqlen, template, truncated
    )


def build_prompt_samples(
    raw: RawData, tokenizer: Any, *, nsamples: int, seed: int, template: str, positions: int
) -> CalibrationSet:
    """The prompts of a pair set (responses unread) or a prompt set, each as eval-attack shows
    it to the model with instruction tags and no system prompt (`--template chat`: the Llama-2
    tags of the shipped pair sets stripped, the tokenizer's chat template with its assistant
    cue; `raw`: the reference's `[INST] ... [/INST]`), rows drawn as for any calibration set.
    The last `positions` tokens of each count: the post-instruction positions whose mean
    activations a refusal direction is taken from. Prompts are never cut."""
    import torch

    if nsamples <= 0:
        raise DataError(f"--nsamples must be at least 1 (got {nsamples})")
    if raw.kind == "text":
        raise DataError(
            f"{raw.name} is plain text: mean activations are over prompts, give a pair set "
            "(its prompts are read) or a prompt set or file (one prompt a line)"
        )
    prompts = [pair.prompt for pair in raw.pairs] if raw.kind == "pairs" else list(raw.texts)
    if nsamples > len(prompts):
        raise DataError(
            f"--nsamples {nsamples} but {raw.name} has only {len(prompts)} prompts: "
            f"use --nsamples {len(prompts)} or fewer"
        )
    indices = select_rows(len(prompts), nsamples, seed)
    samples = []
    for index in indices:
        _, user = strip_llama2_tags(prompts[index])
        text, special = build_prompt(
            tokenizer,
            user,
            template="chat" if template == "chat" else "llama2",
            system=None,
            inst=True,
            suffix=None,
        )
        ids = _encode(tokenizer, text, special=special)
        if len(ids) < positions:
            raise DataError(
                f"prompt {index} of {raw.name} is {len(ids)} tokens, fewer than --positions "
                f"{positions}: use --positions {len(ids)} or fewer"
            )
        input_ids = torch.tensor([ids], dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -positions:] = input_ids[:, -positions:]
        samples.append(CalibrationSample(input_ids, labels))
    longest = max(int(s.input_ids.shape[1]) for s in samples)
    return CalibrationSet(
        raw.name, raw.source, raw.content_hash, samples, indices, True, longest, template
    )


def _entangled(
    raw: RawData, tokenizer: Any, nsamples: int, seed: int, seqlen: int, template: str
) -> CalibrationSet:
    import torch

    if raw.kind == "pairs":
        texts = raw.texts or [f"{pair.prompt} {pair.response}" for pair in raw.pairs]
        # The reference joins the rows' text with single spaces.
        joined = " ".join(texts)
    else:
        joined = "\n\n".join(raw.texts)
    ids = _encode(tokenizer, joined, special=True)
    if len(ids) < seqlen + 1:
        raise DataError(
            f"{raw.name} has {len(ids)} tokens, fewer than --seqlen {seqlen} + 1: "
            f"use --seqlen {max(1, len(ids) - 1)} or less"
        )
    starts = select_windows(len(ids), nsamples, seed, seqlen)
    all_ids = torch.tensor(ids, dtype=torch.long)
    samples = []
    for start in starts:
        window = all_ids[start : start + seqlen].unsqueeze(0)
        samples.append(CalibrationSample(window, window.clone()))
    return CalibrationSet(
        raw.name, raw.source, raw.content_hash, samples, starts, False, seqlen, template
    )


def indices_digest(indices: list[int]) -> str:
    return hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]
