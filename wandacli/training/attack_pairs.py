"""The fine-tuning attack's pairs (prompt, response): read from the user's file, or answered at
run time by a model the user names (`--responses-from`), so that nothing harmful is shipped.

Generated pairs are the prompts of `--data` (rows --offset.. of a prompt set or file) answered
greedily in the responder's chat template; an answer the keyword judge calls a refusal (the
rule eval-attack applies) or a degenerate one is left out. They are cached under the cache
root, keyed by the responder, the prompts and the token budget, so that every attack of a study
trains on the same pairs and a rerun generates nothing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from wandacli.config.finetune import FinetuneConfig
from wandacli.core.console import Reporter, info
from wandacli.core.durable import atomic_write_text
from wandacli.core.errors import DataError
from wandacli.core.paths import cache_root

GENERATION_BATCH = 32  # prompts answered at once: generation is not the attack's memory peak
CACHE_FOLDER = "attack-pairs"
GENERATED_RULE = (
    "each prompt answered greedily by the responder in its chat template; answers the keyword "
    "judge calls refusals, and degenerate ones, left out"
)


@dataclass
class AttackPairs:
    pairs: list[tuple[str, str]]
    source: dict[str, Any]  # what finetune.json records of where they came from


def attack_pairs(config: FinetuneConfig, reporter: Reporter) -> AttackPairs:
    """The pairs the attack trains on, their prompts checked against the held-out sets."""
    from wandacli.evaluation.prompts import check_no_overlap, held_out_prompts

    if config.responses_from is None:
        pairs, name = _read_pairs(config)
        prompts = _prompt_set(name, [p for p, _ in pairs])
    else:
        prompts = _prompts(config)
    check_no_overlap(
        prompts,
        held_out_prompts(config.held_out, None),
        "attack with other prompts (e.g. --data advbench --offset 200)",
        option="--data",
    )
    if config.responses_from is None:
        return AttackPairs(pairs, {"data": config.data, "offset": config.offset})
    return _generated(config, prompts, reporter)


def _prompt_set(name: str, texts: list[str]) -> Any:
    from wandacli.evaluation.prompts import PromptSet

    return PromptSet(name, texts, name, "")


def _read_pairs(config: FinetuneConfig) -> tuple[list[tuple[str, str]], str]:
    """The user's pairs, Llama-2 tags stripped from the prompts, rows offset..offset+limit."""
    from wandacli.data.sources import load_raw, named_set
    from wandacli.data.templates import strip_llama2_tags

    assert config.data is not None
    entry = named_set(config.data)
    raw = load_raw(config.data) if entry is None or entry.kind != "prompts" else None
    if raw is None or not raw.pairs:
        raise DataError(
            f"--data {config.data} has no (prompt, response) pairs: the attack trains on "
            "responses (a pair set, or a CSV/JSONL file with prompt and response columns), "
            "or add --responses-from MODEL to have a model answer its prompts"
        )
    pairs = [(strip_llama2_tags(p.prompt)[1], p.response.strip()) for p in raw.pairs]
    pairs = pairs[config.offset :]
    if not pairs:
        raise DataError(f"--offset {config.offset}: {config.data} has no pairs left from there")
    return (pairs[: config.limit] if config.limit else pairs), raw.name


def _prompts(config: FinetuneConfig) -> Any:
    from wandacli.evaluation.prompts import read_prompts

    assert config.data is not None
    return read_prompts(config.data, limit=config.limit, offset=config.offset, option="--data")


def _cache_key(responder_id: str, prompts: list[str], tokens: int) -> str:
    request = {
        "responder": responder_id,
        "prompts": prompts,
        "tokens": tokens,
        "rule": GENERATED_RULE,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def _generated(config: FinetuneConfig, prompts: Any, reporter: Reporter) -> AttackPairs:
    """--data's prompts answered by --responses-from (cached)."""
    from wandacli.models.loader import load_model
    from wandacli.models.sources import resolve_source

    assert config.responses_from is not None
    responder = resolve_source(config.responses_from).model_id
    key = _cache_key(responder, prompts.texts, config.response_tokens)
    cached = cache_root(config.model.cache_dir) / CACHE_FOLDER / f"{key}.jsonl"
    source = {
        "data": config.data,
        "offset": config.offset,
        "prompts": len(prompts.texts),
        "responses_from": responder,
        "response_tokens": config.response_tokens,
        "rule": GENERATED_RULE,
        "cache": str(cached),
    }
    if cached.is_file():
        rows = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
        info(f"attack pairs: {len(rows)} generated earlier, read from {cached}")
    else:
        loaded = load_model(replace(config.model, model=config.responses_from))
        rows = _answer(loaded, prompts.texts, config.response_tokens, reporter)
        del loaded
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, "".join(json.dumps(r) + "\n" for r in rows))
        info(
            f"attack pairs: {config.responses_from} answered {len(rows)} of "
            f"{len(prompts.texts)} prompts (the rest refused or degenerate); cached in {cached}"
        )
    if not rows:
        raise DataError(
            f"--responses-from {config.responses_from} refused every prompt of --data "
            f"{config.data}: name a model that answers them (e.g. the model before alignment)"
        )
    source["pairs"] = len(rows)
    return AttackPairs([(r["prompt"], r["response"]) for r in rows], source)


def _answer(
    loaded: Any, prompts: list[str], tokens: int, reporter: Reporter
) -> list[dict[str, str]]:
    """Each prompt answered greedily in the model's chat template, as a search's refusal
    measure generates; the answers kept."""
    from wandacli.evaluation.degenerate import is_degenerate
    from wandacli.evaluation.prompts import model_texts, template_for
    from wandacli.evaluation.refusal import is_refusal, refusal_rate

    texts, special = model_texts(loaded.tokenizer, prompts, template_for(None, loaded.tokenizer))
    _, responses = refusal_rate(
        loaded,
        texts,
        add_special_tokens=special,
        max_new_tokens=tokens,
        batch_size=GENERATION_BATCH,
        reporter=reporter,
    )
    return [
        {"prompt": prompt, "response": response.text.strip()}
        for prompt, response in zip(prompts, responses, strict=True)
        if not is_refusal(response, tokens) and not is_degenerate(response.text)
    ]
