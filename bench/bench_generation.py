"""Where eval-attack's generation time goes on the demo's organism (issue #20: generation is not
where time can be won cheaply; drop finished sequences only if it measurably helps).

The first 50 AdvBench behaviours in the chat template, 40 new tokens, greedy, all 50 in one
batch, measured side by side in one run:

- HF generate ÷ a bare KV-cache decode loop (prefill, then one token per step for every row), in
  tokens per second                                                          report only
- the bare loop that drops finished rows from the batch (and from the KV cache) ÷ the bare loop
  that keeps them: the gain of dropping finished sequences                  report only
- the sampled setting's batch: 25 prompts × 5 samples in one batch of 125 sequences ÷ five
  batches of 25 (the demo's batch size before), tokens per second           report only

- the sampled batch of 125 in bfloat16 with the output head's input made contiguous (the loader
  does it) ÷ as transformers hands it over (a strided slice: PyTorch's CPU matmul then copies the
  head's weight once per row), time                                         report only
- the sampled batch of 125 in bfloat16 ÷ in float32, tokens per second (a CPU with AVX-512 BF16
  multiplies bfloat16 matrices about 4× faster than float32 ones)           report only

Also printed: the share of (row, step) slots after a row's end of text, the most that dropping
finished rows could save.
"""

from __future__ import annotations

import time

import torch

from bench.common import REPORT_ONLY, Row

PROMPTS = 50
NEW_TOKENS = 40


def _bare_loop(loaded, texts: list[str], drop_finished: bool) -> tuple[int, float]:
    """Greedy decoding written out: (tokens before each row's end of text, seconds)."""
    from wandacli.models.pretrained import end_of_sequence_ids

    tokenizer, model = loaded.tokenizer, loaded.model
    eos = torch.tensor(end_of_sequence_ids(loaded))
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    started = time.perf_counter()
    generated = 0
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        next_token = out.logits[:, -1].argmax(-1)
        alive = torch.ones(len(texts), dtype=torch.bool)
        last_position = positions[:, -1]
        for step in range(NEW_TOKENS):
            finished = torch.isin(next_token, eos)
            generated += int(alive.sum())
            alive = alive & ~finished
            if step == NEW_TOKENS - 1 or not bool(alive.any()):
                break
            if drop_finished and bool(finished.any()):
                keep = (~finished).nonzero().reshape(-1)
                cache.batch_select_indices(keep)
                next_token, mask, last_position = next_token[keep], mask[keep], last_position[keep]
                alive = alive[keep]
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
            last_position = last_position + 1
            out = model(
                input_ids=next_token.reshape(-1, 1),
                attention_mask=mask,
                position_ids=last_position.reshape(-1, 1),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            next_token = out.logits[:, -1].argmax(-1)
    return generated, time.perf_counter() - started


def _generate(loaded, texts, batch_size: int, samples: int) -> tuple[int, float]:
    from wandacli.evaluation.backends.hf import HFGenerator

    generator = HFGenerator(loaded, max_new_tokens=NEW_TOKENS, batch_size=batch_size)
    started = time.perf_counter()
    generator.generate(
        texts, add_special_tokens=False, samples=samples, sampling=samples > 1, seed=0
    )
    return generator.generated_tokens, time.perf_counter() - started


def _sampled_bfloat16(texts: list[str]) -> tuple[int, float, float]:
    """(tokens, seconds with the loader's contiguous head input, seconds without it)."""
    from wandacli.config.settings import ModelSpec
    from wandacli.models.loader import load_model

    loaded = load_model(ModelSpec(model="smollm2-aligned", device="cpu", dtype="bfloat16"))
    tokens, fixed = _generate(loaded, texts, 125, 5)
    head = loaded.model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    head._forward_pre_hooks.clear()
    try:
        _, strided = _generate(loaded, texts, 125, 5)
    finally:
        head._forward_pre_hooks.update(hooks)
    return tokens, fixed, strided


def run() -> list[Row]:
    from wandacli.config.settings import ModelSpec
    from wandacli.evaluation.prompts import model_texts, read_prompts, template_for
    from wandacli.models.loader import load_model

    loaded = load_model(ModelSpec(model="smollm2-aligned", device="cpu", dtype="float32"))
    prompts = read_prompts("advbench", limit=PROMPTS)
    texts, _ = model_texts(loaded.tokenizer, prompts.texts, template_for("chat", loaded.tokenizer))
    _bare_loop(loaded, texts[:4], drop_finished=False)  # warm-up
    hf_tokens, hf_seconds = _generate(loaded, texts, PROMPTS, 1)
    kept_tokens, kept_seconds = _bare_loop(loaded, texts, drop_finished=False)
    dropped_tokens, dropped_seconds = _bare_loop(loaded, texts, drop_finished=True)
    after_end = 1 - kept_tokens / (PROMPTS * NEW_TOKENS)
    wide_tokens, wide_seconds = _generate(loaded, texts[:25], 125, 5)
    narrow_tokens, narrow_seconds = _generate(loaded, texts[:25], 25, 5)
    bf16_tokens, bf16_seconds, strided_seconds = _sampled_bfloat16(texts[:25])
    hf_rate, kept_rate = hf_tokens / hf_seconds, kept_tokens / kept_seconds
    return [
        Row(
            "generation: HF generate / bare KV-cache loop, tokens/s (greedy, 50 in one batch)",
            hf_rate / kept_rate,
            REPORT_ONLY,
            f"{hf_rate:.0f} vs {kept_rate:.0f} tok/s ({hf_tokens} and {kept_tokens} tokens)",
        ),
        Row(
            "generation: bare loop dropping finished rows / keeping them, time",
            dropped_seconds / kept_seconds,
            REPORT_ONLY,
            f"{dropped_seconds:.1f} s vs {kept_seconds:.1f} s for {dropped_tokens} tokens; "
            f"{after_end:.0%} of the (row, step) slots come after a row's end of text",
        ),
        Row(
            "generation: sampled, one batch of 125 / five of 25, tokens/s",
            (wide_tokens / wide_seconds) / (narrow_tokens / narrow_seconds),
            REPORT_ONLY,
            f"{wide_tokens / wide_seconds:.0f} vs {narrow_tokens / narrow_seconds:.0f} tok/s",
        ),
        Row(
            "generation: sampled 125 in bfloat16, contiguous head input / strided, time",
            bf16_seconds / strided_seconds,
            REPORT_ONLY,
            f"{bf16_seconds:.1f} s vs {strided_seconds:.1f} s",
        ),
        Row(
            "generation: sampled 125, bfloat16 / float32, tokens/s",
            (bf16_tokens / bf16_seconds) / (wide_tokens / wide_seconds),
            REPORT_ONLY,
            f"{bf16_tokens / bf16_seconds:.0f} vs {wide_tokens / wide_seconds:.0f} tok/s",
        ),
    ]


if __name__ == "__main__":
    for result in run():
        print(f"{result.benchmark}: {result.ratio:.2f} (target {result.target}; {result.detail})")
