"""eval-attack's generation on SmolLM2: 32 AdvBench prompts, 64 new tokens, batched
(--batch-size 16) against one prompt at a time, side by side (eval issue target):

- generated tokens per second, batched ÷ one at a time                   target >= 4
"""

from __future__ import annotations

import time

from bench.common import Row

PROMPTS = 32
NEW_TOKENS = 64


def _rate(loaded, texts, batch_size: int) -> tuple[float, int, float]:
    from wandacli.evaluation.backends.hf import HFGenerator

    generator = HFGenerator(loaded, max_new_tokens=NEW_TOKENS, batch_size=batch_size)
    started = time.perf_counter()
    generator.generate(texts, add_special_tokens=False, samples=1, sampling=False, seed=0)
    seconds = time.perf_counter() - started
    return generator.generated_tokens / seconds, generator.generated_tokens, seconds


def run() -> list[Row]:
    from wandacli.config.evaluation import AttackConfig
    from wandacli.config.settings import ModelSpec
    from wandacli.data.templates import build_prompt
    from wandacli.evaluation.prompts import load_prompts
    from wandacli.models.loader import load_model

    loaded = load_model(ModelSpec(model="smollm2", device="cpu"))
    prompts, _, _ = load_prompts(AttackConfig(limit=PROMPTS))
    texts = [
        build_prompt(loaded.tokenizer, p, template="chat", system=None, inst=True, suffix=None)[0]
        for p in prompts
    ]
    _rate(loaded, texts[:2], 2)  # warm-up
    batched, batched_tokens, batched_seconds = _rate(loaded, texts, 16)
    single, single_tokens, single_seconds = _rate(loaded, texts, 1)
    return [
        Row(
            "eval-attack: tokens/s batched (16) / one at a time",
            batched / single,
            ">= 4",
            f"{batched:.0f} tok/s ({batched_tokens} in {batched_seconds:.0f} s) vs "
            f"{single:.0f} tok/s ({single_tokens} in {single_seconds:.0f} s)",
        )
    ]


if __name__ == "__main__":
    for result in run():
        print(f"{result.benchmark}: {result.ratio:.2f} (target {result.target}; {result.detail})")
