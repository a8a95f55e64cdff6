"""What the model judges share: their model loaded through the one loader, greedy completions,
the next token's distribution over a few answers, and the truncation of long responses that
HarmBench and StrongREJECT apply before judging."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ModelError
from wandacli.evaluation.backends.hf import HFGenerator
from wandacli.evaluation.judges.base import format_digest


@dataclass(frozen=True)
class JudgeContext:
    """What eval-attack tells a judge: where its model runs (the model under test's device,
    dtype and cache), its batch size, and the response budget (for the keyword rule)."""

    model_spec: ModelSpec
    batch_size: int
    max_new_tokens: int


class ClassifierModel:
    """A judge's model, loaded through the shared loader on eval-attack's device and dtype."""

    def __init__(self, model: str, context: JudgeContext) -> None:
        from wandacli.models.loader import load_model

        spec = context.model_spec
        self.loaded = load_model(
            ModelSpec(model=model, dtype=spec.dtype, device=spec.device, cache_dir=spec.cache_dir)
        )
        self.batch_size = context.batch_size

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def describe(self, judge: str, rule: str, format_name: str, *templates: str) -> dict[str, Any]:
        """A judge of this model, as results.json records it: its name and rule, the model as
        loaded (its id and, from the hub, the commit it came from), its prompt format and a
        digest of the template text."""
        config = self.loaded.model.config
        return {
            "judge": judge,
            "model": self.loaded.model_id,
            "revision": getattr(config, "_commit_hash", None),
            "format": format_name,
            "format_sha256": format_digest(*templates),
            "rule": rule,
        }

    def complete(
        self, texts: Sequence[str], *, max_new_tokens: int, add_special_tokens: bool
    ) -> list[str]:
        """Each text's greedy continuation (the judges' published decoding: temperature 0)."""
        generator = HFGenerator(
            self.loaded, max_new_tokens=max_new_tokens, batch_size=self.batch_size
        )
        answers = generator.generate(
            texts, add_special_tokens=add_special_tokens, samples=1, sampling=False, seed=0
        )
        return [group[0].text for group in answers]

    def answer_probabilities(
        self, texts: Sequence[str], answers: Sequence[str], *, add_special_tokens: bool
    ) -> list[list[float]]:
        """For each text, the next token's probabilities over `answers` (single tokens),
        renormalised among them: a softmax of their logits, as StrongREJECT scores."""
        import torch

        tokenizer = self.tokenizer
        ids = [tokenizer.convert_tokens_to_ids(a) for a in answers]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ModelError(
                f"the judge's tokenizer has no single token for each of {', '.join(answers)}: "
                "use the judge's own model (its tokenizer has them)"
            )
        model, device = self.loaded.model, self.loaded.input_device
        pad = int(tokenizer.pad_token_id)
        rows = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        probabilities: list[list[float]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(r) for r in chunk)
            # Right padding: each row's last real token is where its next token is read.
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
            mask = torch.tensor(
                [[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device
            )
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            last = torch.tensor([len(r) - 1 for r in chunk], device=logits.device)
            chosen = logits[torch.arange(len(chunk), device=logits.device), last][:, ids]
            probabilities.extend(chosen.float().softmax(dim=-1).cpu().tolist())
        return probabilities

    def truncated(self, text: str, max_tokens: int) -> str:
        """`text` as HarmBench's evaluate_completions.py clips a generation: encoded by the
        judge's tokenizer to at most `max_tokens` tokens (its special tokens included),
        decoded without them."""
        ids = self.tokenizer.encode(text, max_length=max_tokens, truncation=True)
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
