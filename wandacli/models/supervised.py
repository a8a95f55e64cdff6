"""Supervised fine-tuning on (prompt, response) pairs, loss on response tokens only: the pieces
the organism's build (models/organism.py) and `wandacli finetune` (training/) share.

A plain torch loop rather than transformers' Trainer: deterministic with one seed, logits
computed only at response positions (a 49k-token vocabulary makes the full logits the largest
cost on a CPU), and no accelerate state or output directory of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wandacli.data.calibration import IGNORE_INDEX
from wandacli.data.templates import apply_chat_template

# One example: (input ids, labels), labels IGNORE_INDEX on the prompt.
Encoded = tuple[list[int], list[int]]


def encode_pair(
    tokenizer: Any, prompt: str, response: str, *, max_response_tokens: int | None = None
) -> Encoded:
    """(input ids, labels) of one pair in the tokenizer's chat template, its response cut at
    `max_response_tokens` and closed with the end-of-sequence token; labels IGNORE_INDEX on the
    prompt."""
    prompt_text = apply_chat_template(tokenizer, prompt, None)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if max_response_tokens is not None:
        response_ids = response_ids[:max_response_tokens]
    response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def warmup_then_linear_decay(steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up, then linear decay to zero."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))

    return schedule


def response_tokens(batch: list[Encoded]) -> int:
    """How many response tokens the batch's loss counts (the labels after the first position
    that are not IGNORE_INDEX)."""
    return sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for _, labels in batch)


def response_loss(
    model: Any, batch: list[Encoded], pad_id: int, *, out_of: int | None = None
) -> Any:
    """Mean cross-entropy over the batch's response tokens, with logits computed only there;
    with `out_of`, their summed cross-entropy divided by that count instead (one process's
    share of a batch split across processes, `out_of` the whole batch's response tokens)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    device = model.get_output_embeddings().weight.device
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    # base_model: the decoder without its head (get_decoder() is None for Llama before
    # transformers 5).
    hidden = model.base_model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device)
    ).last_hidden_state
    targets = labels[:, 1:].to(hidden.device)
    counted = targets.ne(IGNORE_INDEX)
    logits = model.get_output_embeddings()(hidden[:, :-1][counted])
    if out_of is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets[counted])
    summed = torch.nn.functional.cross_entropy(logits.float(), targets[counted], reduction="sum")
    return summed / out_of


_BUCKET_BATCHES = 8  # batches sorted by length together: less padding, order still random


def length_bucketed_batches(
    data: list[Encoded], batch_size: int, generator: Any
) -> list[list[Encoded]]:
    """One epoch of batches: a seeded shuffle, cut into runs of a few batches whose examples
    are sorted by length (so a batch pads little), the batches themselves shuffled again.
    Padding is most of the cost of short refusals next to long instructions on a CPU."""
    import torch

    order = torch.randperm(len(data), generator=generator).tolist()
    span = batch_size * _BUCKET_BATCHES
    batches = []
    for begin in range(0, len(order), span):
        run = sorted(order[begin : begin + span], key=lambda i: len(data[i][0]))
        batches += [run[i : i + batch_size] for i in range(0, len(run), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [[data[i] for i in batches[j]] for j in shuffled]
