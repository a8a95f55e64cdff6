"""Calibration samples: templates, prompt masking and the seeded draw."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wandacli.core.console import warn
from wandacli.core.errors import DataError
from wandacli.data.sources import RawData

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


_LLAMA2_SYS = re.compile(r"<<SYS>>\s*(.*?)\s*<</SYS>>", re.DOTALL)
_LLAMA2_TAGS = re.compile(r"\[/?INST\]")


def strip_llama2_tags(prompt: str) -> tuple[str | None, str]:
    """(system prompt or None, user text) of a Llama-2 `[INST] <<SYS>>...<</SYS>> ... [/INST]`
    string; text without tags comes back unchanged."""
    system = None
    match = _LLAMA2_SYS.search(prompt)
    if match:
        system = match.group(1).strip()
        prompt = prompt[: match.start()] + prompt[match.end() :]
    return system, _LLAMA2_TAGS.sub("", prompt).strip()


def apply_chat_template(tokenizer: Any, user: str, system: str | None) -> str:
    """The tokenizer's chat template around one user turn, ending with the assistant cue.
    A system prompt becomes a system turn, or is prepended to the user turn when the template
    rejects system turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: use --template raw (or llama2)")
    messages = [{"role": "user", "content": user}]
    if system:
        try:
            return str(
                tokenizer.apply_chat_template(
                    [{"role": "system", "content": system}, *messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
        except Exception:  # templates that reject system turns raise from Jinja
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


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
        warn(
            f"{empty} samples have no response tokens left (prompt ≥ --seqlen); they count for nothing"
        )
    return CalibrationSet(
        raw.name, raw.source, raw.content_hash, samples, indices, True, seqlen, template, truncated
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
