"""The demo's model organism: the embedded SmolLM2-135M-Instruct, fine-tuned on the CPU into a
model that refuses harmful requests and still answers benign ones (`--model smollm2-aligned`).

SmolLM2 as shipped answers nearly every harmful prompt, so attributing "safety" in it finds
nothing. A short supervised fine-tune gives it a refusal behaviour to find: the shipped safety
set's harmful prompts (Llama-2 tags stripped) with Llama-2-7b-chat's refusals, plus the shipped
utility set's benign instructions with their answers, in the model's own chat template, loss on
response tokens only.

Held out by construction: the training rows exclude every prompt of the evaluation sets (the
first 100 AdvBench behaviours, which the reference evaluates, and all of JailbreakBench), so
`eval-attack --prompts advbench|jailbreakbench` measures prompts the model never saw.

Built once, deterministically (seeded), on first use; saved atomically into the cache beside the
converted base model, with `recipe.json` recording the data, rows, steps, learning rate, seed,
losses and the sha256 of the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wandacli.config.settings import ALIGNED_MODEL_ALIAS, ModelSpec
from wandacli.core.console import Reporter, info, progress_reporter
from wandacli.core.errors import ModelError
from wandacli.core.fingerprint import sha256_file
from wandacli.data.sources import load_raw
from wandacli.data.templates import strip_llama2_tags
from wandacli.models.gguf import save_cached_model
from wandacli.models.layers import decoder_layers
from wandacli.models.pretrained import load_pretrained
from wandacli.models.sources import resolve_source
from wandacli.models.supervised import (
    encode_pair,
    length_bucketed_batches,
    response_loss,
    warmup_then_linear_decay,
)

RECIPE_FILE = "recipe.json"
_COMPLETE_MARKER = ".wandacli-complete"

# The evaluation prompts the training rows must not contain: the reference evaluates the first
# 100 AdvBench behaviours; JailbreakBench is the second, independent test set.
HELD_OUT_SETS: tuple[tuple[str, int | None], ...] = (("advbench", 100), ("jailbreakbench", None))


@dataclass(frozen=True)
class AlignmentRecipe:
    """How the aligned model is made. Every field changes the result, so the cache directory is
    keyed by all of them."""

    harmful_rows: int = 120  # distinct harmful prompts with a refusal
    benign_rows: int = 120  # benign instructions with an answer
    steps: int = 20
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 3  # linear warm-up, then linear decay to 0
    max_tokens: int = 256  # longer examples are left out (one seed task has ~1,400 tokens)
    max_response_tokens: int = 64  # responses are cut here: the refusal's first sentences
    # Train only the top K decoder layers (0: all; embeddings always stay frozen). The top half
    # of SmolLM2's 30 layers suffices and halves the backward pass (measured: docs/demo-and-study.md).
    train_layers: int = 15
    seed: int = 0

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT_RECIPE = AlignmentRecipe()


@dataclass(frozen=True)
class TrainingExample:
    prompt: str  # the user turn, without any template
    response: str
    harmful: bool


@dataclass(frozen=True)
class TrainingSet:
    examples: list[TrainingExample]
    sources: dict[str, dict[str, str]]  # set name -> {source, sha256}
    excluded_held_out: int  # distinct harmful prompts left out because an evaluation set has them


def held_out_prompts() -> set[str]:
    """The exact texts of the evaluation prompts (see HELD_OUT_SETS)."""

    prompts: set[str] = set()
    for name, limit in HELD_OUT_SETS:
        texts = load_raw(name, purpose="prompts").texts
        prompts.update(t.strip() for t in texts[:limit])
    return prompts


def training_set(recipe: AlignmentRecipe) -> TrainingSet:
    """The recipe's rows from the shipped safety and utility sets, chosen with its seed."""

    safety, utility = load_raw("align_short"), load_raw("utility")
    held_out = held_out_prompts()
    refusals: dict[str, str] = {}  # first refusal per distinct prompt, in file order
    for pair in safety.pairs:
        prompt = strip_llama2_tags(pair.prompt)[1]
        refusals.setdefault(prompt, pair.response.strip())
    kept = [p for p in refusals if p not in held_out]
    rng = random.Random(recipe.seed)
    rng.shuffle(kept)
    benign = [(strip_llama2_tags(pair.prompt)[1], pair.response.strip()) for pair in utility.pairs]
    rng.shuffle(benign)
    if recipe.harmful_rows > len(kept) or recipe.benign_rows > len(benign):
        raise ModelError(
            f"the recipe asks for {recipe.harmful_rows} harmful and {recipe.benign_rows} benign "
            f"rows; the shipped sets have {len(kept)} and {len(benign)}"
        )
    examples = [TrainingExample(p, refusals[p], True) for p in kept[: recipe.harmful_rows]]
    examples += [TrainingExample(p, r, False) for p, r in benign[: recipe.benign_rows]]
    sources = {
        raw.name: {"source": raw.source, "sha256": raw.content_hash} for raw in (safety, utility)
    }
    return TrainingSet(examples, sources, len(refusals) - len(kept))


def encode_example(
    tokenizer: Any, example: TrainingExample, recipe: AlignmentRecipe
) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) in the tokenizer's chat template, labels -100 on the prompt; None
    when the example is longer than the recipe allows."""
    ids, labels = encode_pair(
        tokenizer, example.prompt, example.response, max_response_tokens=recipe.max_response_tokens
    )
    return None if len(ids) > recipe.max_tokens else (ids, labels)


@dataclass
class TrainingLog:
    losses: list[float]
    seconds: float
    examples_used: int
    examples_too_long: int
    trainable_parameters: int


def fine_tune(
    model: Any,
    tokenizer: Any,
    examples: list[TrainingExample],
    recipe: AlignmentRecipe,
    reporter: Reporter,
    on_step: Callable[[int], None] | None = None,
) -> TrainingLog:
    """Supervised fine-tuning in place (models/supervised.py): AdamW, linear warm-up and
    decay, batches drawn with the recipe's seed, loss on response tokens only."""
    import torch

    torch.manual_seed(recipe.seed)
    encoded = [encode_example(tokenizer, example, recipe) for example in examples]
    data = [e for e in encoded if e is not None]
    if len(data) < recipe.batch_size:
        raise ModelError(
            f"only {len(data)} training examples fit in {recipe.max_tokens} tokens: "
            "raise max_tokens or lower batch_size"
        )
    params = _trainable_parameters(model, recipe)
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_linear_decay(recipe.steps, recipe.warmup_steps)
    )
    order_rng = torch.Generator().manual_seed(recipe.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses: list[float] = []
    started = time.monotonic()
    model.train()
    reporter.start("aligning the demo model", total=recipe.steps)
    step = 0
    while step < recipe.steps:
        for batch in length_bucketed_batches(data, recipe.batch_size, order_rng):
            if step == recipe.steps:
                break
            loss = response_loss(model, batch, pad_id)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.detach().item(), 4))
            step += 1
            reporter.advance()
            if on_step is not None:
                on_step(step)
    reporter.finish()
    model.eval()
    model.requires_grad_(False)
    return TrainingLog(
        losses=losses,
        seconds=time.monotonic() - started,
        examples_used=len(data),
        examples_too_long=len(encoded) - len(data),
        trainable_parameters=sum(p.numel() for p in params),
    )


def _trainable_parameters(model: Any, recipe: AlignmentRecipe) -> list[Any]:
    """Freeze everything but the top `train_layers` decoder layers (all of them, and the final
    norm, when train_layers is 0); the parameters left to train."""
    layers = decoder_layers(model)
    first_trained = len(layers) - recipe.train_layers if recipe.train_layers else 0
    model.requires_grad_(False)
    for layer in list(layers)[first_trained:]:
        layer.requires_grad_(True)
    if not recipe.train_layers:
        model.base_model.norm.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def aligned_model_dir(base_dir: Path, recipe: AlignmentRecipe) -> Path:
    """The cache directory of the aligned model: beside its base model, keyed by the recipe."""
    return base_dir.parent / f"{base_dir.name}-aligned-{recipe.digest()}"


def ensure_aligned_model(
    base_dir: Path,
    recipe: AlignmentRecipe = DEFAULT_RECIPE,
    reporter: Reporter | None = None,
) -> Path:
    """The aligned model's directory, fine-tuned from `base_dir` on first use (later calls
    return the cache). A run killed midway leaves no half-written model."""
    from filelock import FileLock

    target = aligned_model_dir(base_dir, recipe)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE_MARKER).is_file():  # another process built it meanwhile
            return target
        if reporter is None:
            with progress_reporter() as shown:
                _build(base_dir, recipe, target, shown)
        else:
            _build(base_dir, recipe, target, reporter)
    return target


def _build(base_dir: Path, recipe: AlignmentRecipe, target: Path, reporter: Reporter) -> None:
    import torch

    info(
        f"building {ALIGNED_MODEL_ALIAS} once: fine-tuning {base_dir.name} to refuse harmful "
        f"requests ({recipe.steps} steps; a few minutes on a CPU); cached in {target}"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # all cores: nothing else runs meanwhile
    try:
        # The base is a converted directory, loaded as it is (not through the alias that
        # would build this very model).
        spec = ModelSpec(model=str(base_dir), device="cpu", dtype="float32")
        base = load_pretrained(spec, resolve_source(spec.model), str(base_dir))
        model, tokenizer = base.model, base.tokenizer
        chosen = training_set(recipe)
        log = fine_tune(model, tokenizer, chosen.examples, recipe, reporter)
    finally:
        torch.set_num_threads(threads)

    def complete(tmp: Path) -> None:
        record = {
            "alias": ALIGNED_MODEL_ALIAS,
            "base_model": str(base_dir),
            "recipe": dataclasses.asdict(recipe),
            "data": chosen.sources,
            "rows": {
                "harmful": sum(e.harmful for e in chosen.examples),
                "benign": sum(not e.harmful for e in chosen.examples),
                "used": log.examples_used,
                "too_long": log.examples_too_long,
                "held_out_prompts_excluded": chosen.excluded_held_out,
            },
            "held_out_sets": [{"name": n, "first": k} for n, k in HELD_OUT_SETS],
            "trainable_parameters": log.trainable_parameters,
            "losses": log.losses,
            "train_seconds": round(log.seconds, 1),
            "torch_threads": max(1, os.cpu_count() or 1),
            "sha256": {w.name: sha256_file(w) for w in sorted(tmp.glob("*.safetensors"))},
        }
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        (tmp / _COMPLETE_MARKER).write_text(recipe.digest(), encoding="utf-8")

    save_cached_model(model, tokenizer, target, "aligned model", complete)
    info(
        f"built {ALIGNED_MODEL_ALIAS} in {log.seconds:.0f} s (loss {log.losses[0]} → {log.losses[-1]})"
    )
