"""Generation with vLLM (optional extra)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wandacli.core.console import NullReporter, Reporter, info
from wandacli.core.errors import ConfigError
from wandacli.evaluation.under_test import (
    ModelUnderTest,
)


def require_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError(
            "--backend vllm needs vLLM: pip install 'wandacli[vllm]' (or use --backend hf)"
        ) from None
    return vllm


class VLLMGenerator:
    """vLLM (an optional extra) on a temporary saved copy of the model under test, with the
    prompts tokenized here so both backends see the same tokens."""

    def __init__(
        self, under_test: ModelUnderTest, *, max_new_tokens: int, reporter: Reporter | None = None
    ) -> None:
        self.vllm = require_vllm()
        self.loaded = under_test.loaded
        self.max_new_tokens = max_new_tokens
        self.reporter = reporter or NullReporter()
        self.generated_tokens = 0
        self.copy = Path(tempfile.mkdtemp(prefix="wandacli-vllm-"))
        info(f"saving the model under test to {self.copy} for vLLM")
        self.loaded.model.save_pretrained(str(self.copy))
        self.loaded.tokenizer.save_pretrained(str(self.copy))
        dtype = str(self.loaded.dtype).removeprefix("torch.")
        self.engine = self.vllm.LLM(model=str(self.copy), tokenizer=str(self.copy), dtype=dtype)

    def generate(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool,
        samples: int,
        sampling: bool,
        seed: int,
        temperature: float = 1.0,
    ) -> list[list[str]]:
        tokenizer = self.loaded.tokenizer
        prompts = [
            {"prompt_token_ids": tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]}
            for t in texts
        ]
        params = self.vllm.SamplingParams(
            n=samples,
            temperature=temperature if sampling else 0.0,
            max_tokens=self.max_new_tokens,
            seed=seed,
        )
        outputs = self.engine.generate(prompts, params)
        results = []
        for output in outputs:
            results.append([o.text for o in output.outputs])
            self.generated_tokens += sum(len(o.token_ids) for o in output.outputs)
        self.reporter.advance(len(texts))
        return results

    def close(self) -> None:
        shutil.rmtree(self.copy, ignore_errors=True)
