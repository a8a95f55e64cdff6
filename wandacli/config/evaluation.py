"""The settings of `eval-attack` and `eval-utility`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wandacli.config.declare import (
    FRACTION,
    at_least,
    check_options,
    internal,
    nested,
    option,
    settings_json,
)
from wandacli.config.settings import DATA_DIR_HELP, MODEL_PANEL, NAMED_PROMPT_SETS, ModelSpec
from wandacli.core import reference
from wandacli.core.errors import ConfigError
from wandacli.core.judges import JUDGE_NAMES, parse_judge
from wandacli.core.metrics import ATTACK_CONFIGS
from wandacli.core.reference import ZERO_SHOT_TASKS

# ---------------------------------------------------------------------------------------------
# eval-attack and eval-utility

RESULTS_DIR = Path("wandacli-results")
STORE_RESULTS = "results"  # beside a store's scores/, masks/ and edits/


def results_root(store: Path | None) -> Path:
    """Where evaluation results go without --out: STORE/results when a store is given (the
    mask's or edit's), else ./wandacli-results."""
    return store / STORE_RESULTS if store is not None else RESULTS_DIR


# The KL cost's defaults (eval-utility --kl and search): the harmless prompts, how many, and
# how many response positions.
# The named prompt set of the shipped utility set's instructions that the demo's organism was
# not tuned on (evaluation/prompts.py reads it).
UTILITY_HELD_OUT = "utility-held-out"
KL_PROMPTS = UTILITY_HELD_OUT
KL_LIMIT = 32
KL_POSITIONS = 4


GENERATION_PANEL = "Generation"
PROMPTS_PANEL = "Prompts"
KL_PANEL = "KL"
PROMPT_TEMPLATE = Literal["chat", "llama2"]


def removal_option() -> Any:
    """`--mask`/`--edit`: a stored removal applied in memory (a mask, a rank edit or a
    direction)."""
    return option(
        None,
        "--mask",
        "--edit",
        help="A mask or an edit (name in --store, or path to its .h5) applied in memory: "
        "no pruned or edited copy on disk.",
        panel=MODEL_PANEL,
    )


def allow_other_model_option() -> Any:
    # Bookkeeping, not part of the request: the results record the transfer instead.
    return option(
        False,
        "--allow-other-model",
        help="Apply a mask or edit made on another model of the same shapes (a deliberate "
        "transfer, e.g. from the base model to its chat model); refused otherwise. The "
        "results record the model it was made on.",
        panel=MODEL_PANEL,
        request=False,
    )


def removal_store_option() -> Any:
    return option(
        None, "--store", "-s", help="Store to look the mask or edit up in.", panel=MODEL_PANEL
    )


def out_option() -> Any:
    return option(
        None,
        "--out",
        "-o",
        help="Results directory [default: STORE/results/<mask, edit or model> with --store, "
        "else wandacli-results/<...>].",
        request=False,
    )


def prompt_column_option(panel: str) -> Any:
    return option(None, "--prompt-column", help="Prompt column of a table file.", panel=panel)


def template_option(help: str, panel: str) -> Any:
    return option(None, "--template", help=help, panel=panel)


def held_out_option(default: str, kept_apart: str, panel: str) -> Any:
    """`--held-out`: the evaluation prompts `kept_apart` must not contain (search's prompts,
    the attack's), refused before any model loads (evaluation/prompts.py `check_no_overlap`)."""
    return option(
        default,
        "--held-out",
        metavar="<NAME[:N],...>",
        help=f"Evaluation prompts {kept_apart} must not contain ('none' to skip the check).",
        panel=panel,
        request=False,
    )


def data_dir_option() -> Any:
    return option(None, "--data-dir", help=DATA_DIR_HELP, panel="Data", request=False)


# The KL cost, in eval-utility --kl and search: declared once, embedded in both.
@dataclass(frozen=True)
class KlSettings:
    """The KL cost's prompts: how many, and over how many response positions."""

    kl_prompts: str = option(
        KL_PROMPTS,
        "--kl-prompts",
        metavar="<NAME|FILE>",
        help="Harmless prompts for the KL cost [default: utility-held-out, the utility tasks the "
        "demo's organism was not tuned on].",
        panel=KL_PANEL,
    )
    kl_limit: int = option(
        KL_LIMIT, "--kl-limit", help="Harmless prompts used.", panel=KL_PANEL, check=at_least(1)
    )
    kl_positions: int = option(
        KL_POSITIONS,
        "--kl-positions",
        help="Response positions the KL is averaged over (the first: the prompt's last position).",
        panel=KL_PANEL,
        check=at_least(1),
    )

    def __post_init__(self) -> None:
        check_options(self)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _inst_variants(value: bool | tuple[bool, ...]) -> tuple[bool, ...]:
    """--inst/--no-inst: only with or only without tags; neither: both."""
    return value if isinstance(value, tuple) else (value,)


@dataclass(frozen=True)
class AttackConfig:
    """Everything `wandacli eval-attack` needs."""

    model: ModelSpec = nested(ModelSpec)
    removal: str | None = removal_option()
    store: Path | None = removal_store_option()
    allow_other_model: bool = allow_other_model_option()
    prompts: str = option(
        "advbench",
        "--prompts",
        metavar="<NAME|FILE>",
        help="Harmful prompts: a named set or a file. Named: " + NAMED_PROMPT_SETS,
        panel=PROMPTS_PANEL,
    )
    prompt_column: str | None = prompt_column_option(PROMPTS_PANEL)
    limit: int = option(
        reference.ATTACK_PROMPTS_USED,
        "--limit",
        help="First N prompts (the reference uses 100).",
        panel=PROMPTS_PANEL,
        check=at_least(1),
    )
    # Left out of the request at 0, as every run made before the option existed.
    offset: int = option(
        0,
        "--offset",
        help="Skip the first N prompts, then take --limit (e.g. --offset 100 --limit 32: "
        "AdvBench's search prompts, after the 100 the reference evaluates).",
        panel=PROMPTS_PANEL,
        check=at_least(0),
        request_omits_default=True,
    )
    configs: tuple[str, ...] = option(
        ATTACK_CONFIGS,
        "--configs",
        metavar="<basic,basic_nosys,multiple_nosys,gcg>",
        help="Comma list of basic, basic_nosys, multiple_nosys, gcg [default: all].",
        panel=PROMPTS_PANEL,
        cli_type=str,
        parse=_comma_list,
        format=",".join,
    )
    inst: tuple[bool, ...] = option(
        (True, False),
        "--inst/--no-inst",
        help="Only with (or without) instruction tags [default: both; GCG always with tags].",
        panel=PROMPTS_PANEL,
        cli_type=bool | None,
        parse=_inst_variants,
        format=lambda value: None if len(value) != 1 else value[0],
    )
    template: PROMPT_TEMPLATE | None = template_option(
        "llama2: the reference's [INST] <<SYS>> strings exactly; chat: the tokenizer's "
        "chat template [default: chat when the tokenizer has one].",
        PROMPTS_PANEL,
    )
    max_new_tokens: int = option(
        reference.MAX_NEW_TOKENS,
        "--max-new-tokens",
        help="Tokens generated per response.",
        panel=GENERATION_PANEL,
        check=at_least(1),
    )
    batch_size: int = option(
        16,
        "--batch-size",
        help="Sequences generated at once (hf backend): with --samples N a batch holds "
        "batch-size // N prompts.",
        panel=GENERATION_PANEL,
        check=at_least(1),
    )
    backend: Literal["hf", "vllm"] = option(
        "hf",
        "--backend",
        help="hf: transformers; vllm: vLLM if installed.",
        panel=GENERATION_PANEL,
    )
    # vLLM: the share of GPU memory it may take (None: vLLM's own default, 0.9), leave room
    # for a classifier judge; its tensor parallelism; where the model's copy for it is saved
    # (None: beside the results).
    gpu_memory_utilization: float | None = option(
        None,
        "--gpu-memory-utilization",
        help="vllm: the share of GPU memory vLLM may take (its default: 0.9); lower it to "
        "leave room for an hf: judge.",
        panel=GENERATION_PANEL,
        check=FRACTION,
    )
    tensor_parallel_size: int = option(
        1,
        "--tensor-parallel-size",
        help="vllm: GPUs one model is split across.",
        panel=GENERATION_PANEL,
        check=at_least(1),
    )
    tmp_dir: Path | None = option(
        None,
        "--tmp-dir",
        help="vllm: where the model under test is saved for vLLM [default: the --out directory].",
        panel=GENERATION_PANEL,
        request=False,
    )
    judge: str = option(
        "keyword",
        "--judge",
        metavar="<NAME[:MODEL]>",
        help="Who decides that an attack succeeded: "
        + "; ".join(f"{j.name}: {j.summary}" for j in JUDGE_NAMES.values())
        + ". :MODEL replaces the judge's published model (a hub id or a directory).",
    )
    # After judging: flag noise by the dense model's perplexity (evaluation/word_salad.py). It
    # reads the responses, so it is not part of what makes them.
    word_salad: bool = option(
        True,
        "--word-salad/--no-word-salad",
        help="Flag the successful responses the dense model finds noise (word salad: "
        "docs/commands.md) beside the repetition rule; the dense model is loaded after the "
        "model under test.",
        request=False,
    )
    rejudge: bool = option(
        False,
        "--rejudge",
        help="Judge the responses stored in --out again with --judge, without generating; "
        "the report then shows how the judges agree.",
        request=False,
    )
    samples: int = option(
        reference.MULTIPLE_SAMPLES,
        "--samples",
        help="Samples per prompt in multiple_nosys.",
        panel=GENERATION_PANEL,
        check=at_least(1),
    )
    temperature: float = internal(reference.MULTIPLE_TEMPERATURE, request=True)
    seed: int = option(
        0, "--seed", help="The sampled responses' seed (multiple_nosys).", panel=GENERATION_PANEL
    )
    out: Path | None = out_option()
    overwrite: bool = option(
        False, "--overwrite", help="Replace results made with other settings.", request=False
    )
    data_dir: Path | None = data_dir_option()

    def __post_init__(self) -> None:
        unknown = [c for c in self.configs if c not in ATTACK_CONFIGS]
        if unknown or not self.configs:
            raise ConfigError(
                f"unknown --configs {','.join(unknown) or '(empty)'}: use a comma list of {', '.join(ATTACK_CONFIGS)}"
            )
        check_options(self)
        parse_judge(self.judge)
        if not self.inst:
            raise ConfigError(
                "no instruction-tag variant chosen: use --inst, --no-inst, or neither for both"
            )

    def to_json(self) -> dict[str, Any]:
        return settings_json(self)


def _zero_shot_tasks(text: str) -> tuple[str, ...]:
    """`reference` (the reference's six tasks) or a comma list of lm-eval task names."""
    return ZERO_SHOT_TASKS if text == "reference" else _comma_list(text)


@dataclass(frozen=True)
class UtilityConfig:
    """Everything `wandacli eval-utility` needs."""

    model: ModelSpec = nested(ModelSpec)
    removal: str | None = removal_option()
    store: Path | None = removal_store_option()
    allow_other_model: bool = allow_other_model_option()
    data: str | None = option(
        "wikitext",
        "--data",
        "-d",
        metavar="<NAME|FILE>",
        help="Perplexity text: wikitext (WikiText-2 test) or a text file; 'none' to skip.",
        cli_type=str,
        parse=lambda text: None if text == "none" else text,
        format=str,
    )
    seqlen: int | None = option(
        None,
        "--seqlen",
        help="Window length [default: min(4096, model context), the reference's Llama-2 window].",
        check=at_least(2),
    )
    limit_windows: int | None = option(
        None,
        "--limit-windows",
        help="Only the first K windows (quick checks).",
        check=at_least(1),
    )
    zero_shot: tuple[str, ...] = option(
        (),
        "--zero-shot",
        help="Comma list of lm-evaluation-harness tasks, or 'reference' for the reference's six "
        "(boolq, rte, hellaswag, winogrande, arc_challenge, openbookqa). Needs wandacli[eval].",
        cli_type=str | None,
        parse=_zero_shot_tasks,
        format=lambda tasks: ",".join(tasks) or None,
    )
    zero_shot_limit: int | None = option(
        reference.ZERO_SHOT_LIMIT,
        "--zero-shot-limit",
        help="Examples per task (the reference's 200).",
        check=at_least(1),
    )
    batch_size: int = option(1, "--batch-size", help="Zero-shot batch size.", check=at_least(1))
    out: Path | None = out_option()
    data_dir: Path | None = data_dir_option()
    # The KL cost (evaluation/divergence.py): from the dense model, on harmless prompts.
    kl: bool = option(
        False,
        "--kl",
        help="The KL cost: mean KL(dense ‖ model) of the next-token distributions on harmless "
        "prompts over the first --kl-positions response positions (the dense side cached).",
        panel=KL_PANEL,
    )
    kl_settings: KlSettings = nested(KlSettings)
    kl_reference: str | None = option(
        None,
        "--kl-reference",
        metavar="<MODEL>",
        help="The dense model the KL is measured from, loaded (and let go) before the model "
        "under test: for a model saved by another tool, or a pruned one [default: --model "
        "itself before its --mask, or the dense model a saved pruned model records].",
        panel=KL_PANEL,
    )
    kl_cache: Path | None = option(
        None,
        "--kl-cache",
        help="Where the dense model's distributions are cached [default: kl-dense/ beside the "
        "results folder].",
        panel=KL_PANEL,
        request=False,
    )
    template: PROMPT_TEMPLATE | None = template_option(
        "The KL prompts' template [default: chat when the tokenizer has one].", KL_PANEL
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.kl_reference is not None and not self.kl:
            raise ConfigError("--kl-reference is the dense model of the KL cost: add --kl")
        if self.data is None and not self.zero_shot and not self.kl:
            raise ConfigError(
                "nothing to evaluate: keep --data (perplexity), or add --kl or --zero-shot TASKS"
            )
