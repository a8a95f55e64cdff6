"""Batched generation with transformers (left padding)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wandacli.core.console import NullReporter, Reporter
from wandacli.evaluation.backends.base import Backend, Response, always_available
from wandacli.models.pretrained import end_of_sequence_ids

if TYPE_CHECKING:
    from wandacli.evaluation.prefix import PassPlan

# ---------------------------------------------------------------------------------------------
# Generation


def generation_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    add_special_tokens: bool,
    batch_size: int,
    samples: int = 1,
) -> list[list[list[int]]]:
    """The token rows of each batch `HFGenerator.generate` runs: each prompt `samples` times.
    The batch size counts sequences in flight (what memory scales with): a batch holds
    batch_size // samples prompts."""
    prompt_rows = [
        tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] for text in texts
    ]
    prompts_per_batch = max(1, batch_size // samples)
    return [
        [row for row in prompt_rows[start : start + prompts_per_batch] for _ in range(samples)]
        for start in range(0, len(prompt_rows), prompts_per_batch)
    ]


class HFGenerator:
    """Batched generation with transformers, left-padded, on CPU or CUDA."""

    def __init__(
        self, loaded: Any, *, max_new_tokens: int, batch_size: int, reporter: Reporter | None = None
    ) -> None:
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.reporter = reporter or NullReporter()
        self.generated_tokens = 0

    def generate(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool,
        samples: int,
        sampling: bool,
        seed: int,
        temperature: float = 1.0,
        decided: Callable[[str], bool] | None = None,
        plans: Sequence[PassPlan | None] | None = None,
    ) -> list[list[Response]]:
        """For each text, `samples` continuations (greedy, or sampled at `temperature` with a
        seed per batch: top-k and top-p off, as vLLM's defaults; evaluation/sampling.py draws).

        The prompts of a batch open alike (the chat template's opening, the system prompt): that
        shared prefix is computed once and its keys and values repeated along the batch, each
        prompt's own tokens fed after it (evaluation/prefix.py), the same computation as the
        whole prompts left-padded, up to float rounding. The sampled setting's rows are each
        prompt repeated `samples` times.

        `decided`: a row whose text so far it holds true of needs no more tokens (greedy: it
        leaves the batch, `_greedy_live_rows`; sampled: padding follows), and a batch whose rows
        are all decided or ended stops: the search's refusal rate, where a refusal phrase once
        generated is in the response whatever follows. The responses of such rows end there.

        `plans` (with `decided`, greedy): how each batch's prompts run where not as the whole
        model, a pass from the first changed layer (evaluation/lower_layers.py); the steps
        after them run every layer."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from wandacli.evaluation.prefix import (
            SharedPrefixes,
            prefix_cache,
            prefixed_batch,
            shared_prefix_length,
        )
        from wandacli.evaluation.sampling import InverseCdfSampler
        from wandacli.models.pretrained import cache_keyword

        tokenizer = self.loaded.tokenizer
        model = self.loaded.model
        eos = end_of_sequence_ids(self.loaded)
        # Greedy steps: a sampled setting's draw is made by its logits processor.
        generation_config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        eos_ids: set[int | None] = set(eos)
        device = self.loaded.input_device
        batches = generation_batches(
            tokenizer, texts, add_special_tokens=add_special_tokens, batch_size=self.batch_size,
            samples=samples,
        )  # fmt: skip
        if plans is not None and (decided is None or sampling or len(plans) != len(batches)):
            raise ValueError("plans: one per batch, for a greedy generation with `decided`")
        results: list[list[Response]] = []
        shared = SharedPrefixes()  # the batches' common opening, run once on these weights
        drawn = 0  # prompts before this batch: a sampled batch's seed
        for index, rows in enumerate(batches):
            plan = plans[index] if plans is not None else None
            batch = prefixed_batch(rows, shared_prefix_length(rows), int(tokenizer.pad_token_id))
            cache = prefix_cache(model, batch.prefix, len(rows), device, plan, shared)
            if decided is not None and not sampling:
                new_rows = self._greedy_live_rows(batch, cache, decided, eos_ids, plan)
            else:
                extra = {cache_keyword(model): cache} if cache is not None else {}
                # Same samples for the same batches on every run.
                sampler = [InverseCdfSampler(temperature, seed + drawn)] if sampling else []
                stops = [_Decided(tokenizer, batch.full_ids.shape[1], decided)] if decided else []
                with torch.no_grad():
                    output = model.generate(
                        input_ids=batch.full_ids.to(device),
                        attention_mask=batch.attention_mask.to(device),
                        generation_config=generation_config,
                        logits_processor=LogitsProcessorList(sampler),
                        stopping_criteria=StoppingCriteriaList(stops),
                        **extra,
                    )
                new_rows = [r.tolist() for r in output[:, batch.full_ids.shape[1] :].cpu()]
            prompts = len(rows) // samples
            for prompt in range(prompts):
                generated = new_rows[prompt * samples : (prompt + 1) * samples]
                results.append(decoded_responses(tokenizer, generated, eos_ids))
                self.generated_tokens += sum(tokens_before_eos(row, eos_ids) for row in generated)
            drawn += prompts
            self.reporter.advance(prompts)
        return results

    def _greedy_live_rows(
        self,
        batch: Any,
        cache: Any,
        decided: Callable[[str], bool],
        eos_ids: set[int | None],
        plan: PassPlan | None = None,
    ) -> list[list[int]]:
        """Greedy decoding of one batch in which a row leaves the batch (its keys and values
        with it) once it has ended or `decided` holds of its text: `generate` would carry it to
        the end as padding, each step costing as many rows as the batch began with. The live
        rows' tokens are `generate`'s greedy ones (the same positions, masks and argmax of
        float32 logits). Each row's own ids come back, up to its end (`generate` pads them to
        the batch's last step)."""
        import torch

        from wandacli.models.pretrained import accepts_logits_to_keep, cache_keyword, output_cache

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        device = self.loaded.input_device
        pad = int(tokenizer.pad_token_id)
        keyword = cache_keyword(model)
        keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        rows = batch.suffix_ids.shape[0]
        tokens = torch.full((rows, self.max_new_tokens), pad, dtype=torch.long)
        lengths = [self.max_new_tokens] * rows
        live = torch.arange(rows)
        mask = batch.attention_mask.to(device)
        position = batch.position_ids[:, -1:].to(device)
        with torch.no_grad():
            with plan.suffix() if plan is not None else contextlib.nullcontext():
                output = model(
                    input_ids=batch.suffix_ids.to(device),
                    attention_mask=mask,
                    position_ids=batch.position_ids.to(device),
                    use_cache=True,
                    **({keyword: cache} if cache is not None else {}),
                    **keep_last,
                )
            if plan is not None:
                plan.prompt_cache(output_cache(output))
            steps = 0
            while True:
                chosen = output.logits[:, -1, :].float().argmax(-1)
                tokens[live, steps] = chosen.cpu()
                steps += 1
                going = [
                    int(token) not in eos_ids
                    and not decided(tokenizer.decode(tokens[row, :steps], skip_special_tokens=True))
                    for token, row in zip(chosen.tolist(), live.tolist(), strict=True)
                ]
                for row, goes in zip(live.tolist(), going, strict=True):
                    if not goes:
                        lengths[row] = steps
                if steps == self.max_new_tokens or not any(going):
                    break
                cache = output_cache(output)
                if not all(going):
                    # Indices on the CPU index a tensor on any device: a cache spread over
                    # several GPUs (device_map) keeps each layer where it is.
                    kept = torch.tensor(going).nonzero().squeeze(1)
                    cache.batch_select_indices(kept)
                    live, chosen = live[kept], chosen[kept]
                    mask, position = mask[kept], position[kept]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
                position = position + 1
                output = model(
                    input_ids=chosen[:, None].to(device),
                    attention_mask=mask,
                    position_ids=position,
                    use_cache=True,
                    **{keyword: cache},
                    **keep_last,
                )
        return [tokens[row, :length].tolist() for row, length in enumerate(lengths)]

    def close(self) -> None:
        """Nothing to release: the model belongs to the model under test."""


class _Decided:
    """A stopping criterion (transformers' protocol: one bool a row): the row's new text so far
    satisfies `decided`."""

    def __init__(self, tokenizer: Any, prompt_width: int, decided: Callable[[str], bool]) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.decided = decided

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        return torch.tensor([self.decided(t) for t in texts], device=input_ids.device)


def _start(config: Any, under_test: Any, out: Path, reporter: Reporter) -> HFGenerator:
    return HFGenerator(
        under_test.loaded,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        reporter=reporter,
    )


# Sampled responses are drawn by evaluation/sampling.py's inverse-CDF sampler.
BACKEND = Backend("hf", always_available, _start, sampler="inverse-cdf")


def tokens_before_eos(ids: list[int], eos_ids: set[int | None]) -> int:
    """The tokens a response generated, its end of sequence included (padding after it not)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return position + 1
    return len(ids)


def decoded_responses(
    tokenizer: Any, rows: list[list[int]], eos_ids: set[int | None]
) -> list[Response]:
    """Each row of generated ids as a response; it ended when an end of sequence is in it
    (a row without one ran to the token budget)."""
    return [
        Response(
            tokenizer.decode(row, skip_special_tokens=True),
            ended=any(token in eos_ids for token in row),
        )
        for row in rows
    ]
