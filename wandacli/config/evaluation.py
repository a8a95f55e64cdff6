"""The settings of `eval-attack` and `eval-utility`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wandacli.config.settings import ModelSpec
from wandacli.core import reference
from wandacli.core.errors import ConfigError
from wandacli.core.metrics import ATTACK_CONFIGS

# ---------------------------------------------------------------------------------------------
# eval-attack and eval-utility

RESULTS_DIR = Path("wandacli-results")

# The KL cost's defaults (eval-utility --kl and search): the harmless prompts, how many, and
# how many response positions.
# The named prompt set of the shipped utility set's instructions that the demo's organism was
# not tuned on (evaluation/prompts.py reads it).
UTILITY_HELD_OUT = "utility-held-out"
KL_PROMPTS = UTILITY_HELD_OUT
KL_LIMIT = 32
KL_POSITIONS = 4


@dataclass(frozen=True)
class AttackConfig:
    """Everything `wandacli eval-attack` needs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    mask: str | None = None
    store: Path | None = None
    prompts: str = "advbench"
    prompt_column: str | None = None
    limit: int = reference.ATTACK_PROMPTS_USED
    configs: tuple[str, ...] = ATTACK_CONFIGS
    inst: tuple[bool, ...] = (True, False)
    template: str | None = None  # None: chat when the tokenizer has a template, else llama2
    max_new_tokens: int = reference.MAX_NEW_TOKENS
    batch_size: int = 16
    backend: str = "hf"
    # vLLM: the share of GPU memory it may take (None: vLLM's own default, 0.9), leave room
    # for a classifier judge; its tensor parallelism; where the model's copy for it is saved
    # (None: beside the results).
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    tmp_dir: Path | None = None
    judge: str = "keyword"
    samples: int = reference.MULTIPLE_SAMPLES
    temperature: float = reference.MULTIPLE_TEMPERATURE
    seed: int = 0
    out: Path | None = None  # None: wandacli-results/<mask or model>
    overwrite: bool = False
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        unknown = [c for c in self.configs if c not in ATTACK_CONFIGS]
        if unknown or not self.configs:
            raise ConfigError(
                f"unknown --configs {','.join(unknown) or '(empty)'}: use a comma list of {', '.join(ATTACK_CONFIGS)}"
            )
        if self.limit < 1:
            raise ConfigError(f"--limit must be at least 1 (got {self.limit})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1 (got {self.samples})")
        if self.template not in (None, "chat", "llama2"):
            raise ConfigError(f"unknown --template {self.template!r}: use chat or llama2")
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"unknown --backend {self.backend!r}: use hf or vllm")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            )
        if self.tensor_parallel_size < 1:
            raise ConfigError(
                f"--tensor-parallel-size must be at least 1 (got {self.tensor_parallel_size})"
            )
        if self.judge != "keyword" and not (self.judge.startswith("hf:") and len(self.judge) > 3):
            raise ConfigError(
                f"unknown --judge {self.judge!r}: use keyword or hf:MODEL (a HarmBench-style classifier)"
            )
        if not self.inst:
            raise ConfigError(
                "no instruction-tag variant chosen: use --inst, --no-inst, or neither for both"
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("store", "out", "data_dir"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        return data


@dataclass(frozen=True)
class UtilityConfig:
    """Everything `wandacli eval-utility` needs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    mask: str | None = None
    store: Path | None = None
    data: str | None = "wikitext"  # None: no perplexity
    seqlen: int | None = None  # None: min(4096, model context), the reference's Llama-2 window
    limit_windows: int | None = None
    zero_shot: tuple[str, ...] = ()
    zero_shot_limit: int | None = reference.ZERO_SHOT_LIMIT
    batch_size: int = 1
    out: Path | None = None
    data_dir: Path | None = None
    # The KL cost (evaluation/divergence.py): from the dense model, on harmless prompts.
    kl: bool = False
    kl_prompts: str = KL_PROMPTS
    kl_limit: int = KL_LIMIT
    kl_positions: int = KL_POSITIONS
    kl_cache: Path | None = None  # None: <results folder's parent>/kl-dense
    template: str | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--kl-limit", self.kl_limit), ("--kl-positions", self.kl_positions)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1 (got {value})")
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.limit_windows is not None and self.limit_windows < 1:
            raise ConfigError(f"--limit-windows must be at least 1 (got {self.limit_windows})")
        if self.zero_shot_limit is not None and self.zero_shot_limit < 1:
            raise ConfigError(f"--zero-shot-limit must be at least 1 (got {self.zero_shot_limit})")
        if self.data is None and not self.zero_shot and not self.kl:
            raise ConfigError(
                "nothing to evaluate: keep --data (perplexity), or add --kl or --zero-shot TASKS"
            )
