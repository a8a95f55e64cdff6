"""Generation with vLLM (optional extra)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wandacli.core.console import NullReporter, Reporter, info
from wandacli.core.durable import ensure_writable_directory, temporary_path
from wandacli.core.errors import ConfigError
from wandacli.evaluation.backends.base import Backend, Response
from wandacli.evaluation.under_test import (
    ModelUnderTest,
)


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401  (importable: installed and working)
    except ImportError:
        raise ConfigError(
            "--backend vllm needs vLLM: pip install 'wandacli[vllm]' (or use --backend hf)"
        ) from None


def _vllm() -> Any:
    import vllm

    return vllm


class VLLMGenerator:
    """vLLM (an optional extra) on a saved copy of the model under test, with the prompts
    tokenized here so both backends see the same tokens. The copy is written beside the
    results (or --tmp-dir), not to /tmp, and the transformers model is freed before vLLM
    starts: vLLM takes its share of GPU memory at start-up, and a 7B model left on the GPU
    would halve what it gets."""

    def __init__(
        self,
        under_test: ModelUnderTest,
        *,
        max_new_tokens: int,
        reporter: Reporter | None = None,
        copy_parent: Path,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        require_vllm()
        self.vllm = _vllm()
        self.loaded = under_test.loaded
        self.max_new_tokens = max_new_tokens
        self.reporter = reporter or NullReporter()
        self.generated_tokens = 0
        ensure_writable_directory(copy_parent, "--tmp-dir")
        self.copy = temporary_path(copy_parent / "vllm-model")
        shutil.rmtree(self.copy, ignore_errors=True)
        info(f"saving the model under test to {self.copy} for vLLM")
        self.loaded.model.save_pretrained(str(self.copy))
        self.loaded.tokenizer.save_pretrained(str(self.copy))
        dtype = str(self.loaded.dtype).removeprefix("torch.")
        _free_weights(self.loaded.model)
        options: dict[str, Any] = {}
        if gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        if tensor_parallel_size != 1:
            options["tensor_parallel_size"] = tensor_parallel_size
        self.engine = self.vllm.LLM(
            model=str(self.copy), tokenizer=str(self.copy), dtype=dtype, **options
        )

    def generate(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool,
        samples: int,
        sampling: bool,
        seed: int,
        temperature: float = 1.0,
    ) -> list[list[Response]]:
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
            # vLLM's finish_reason: "stop" (an end of sequence) or "length" (the budget).
            results.append(
                [Response(o.text, ended=o.finish_reason != "length") for o in output.outputs]
            )
            self.generated_tokens += sum(len(o.token_ids) for o in output.outputs)
        self.reporter.advance(len(texts))
        return results

    def close(self) -> None:
        shutil.rmtree(self.copy, ignore_errors=True)


def _start(config: Any, under_test: ModelUnderTest, out: Path, reporter: Reporter) -> VLLMGenerator:
    return VLLMGenerator(
        under_test,
        max_new_tokens=config.max_new_tokens,
        reporter=reporter,
        copy_parent=config.tmp_dir or out,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
    )


# vLLM draws with its own sampler, seeded per request.
BACKEND = Backend("vllm", require_vllm, _start, sampler="vllm")


def _free_weights(model: Any) -> None:
    """Release the transformers model's weights (moved to the meta device: shapes kept, no
    storage), and the CUDA cache with them; vLLM generates from its own copy."""
    import gc

    import torch

    model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
