"""`wandacli eval-attack` and `wandacli eval-utility`: the model under test, measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from wandacli.cli.options import (
    CacheDirOption,
    ConfigOption,
    DataDirOption,
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    KlLimitOption,
    KlPositionsOption,
    KlPromptsOption,
    MaskOption,
    MaskStoreOption,
    MaxMemoryOption,
    ModelOption,
    NoProgressOption,
    OutOption,
    OverwriteOption,
    SeedOption,
    model_spec,
)
from wandacli.config.evaluation import (
    KL_LIMIT,
    KL_POSITIONS,
    KL_PROMPTS,
    AttackConfig,
    UtilityConfig,
)
from wandacli.config.settings import DEFAULT_MODEL_ALIAS
from wandacli.core.console import progress_reporter
from wandacli.data.sources import describe_named_sets
from wandacli.reporting import render


def eval_attack(
    ctx: typer.Context,
    model: ModelOption = DEFAULT_MODEL_ALIAS,
    mask: MaskOption = None,
    store: MaskStoreOption = None,
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            metavar="<NAME|FILE>",
            help="Harmful prompts: a named set or a file. Named: " + describe_named_sets("prompts"),
            rich_help_panel="Prompts",
        ),
    ] = "advbench",
    prompt_column: Annotated[
        str | None,
        typer.Option(
            "--prompt-column", help="Prompt column of a table file.", rich_help_panel="Prompts"
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", help="First N prompts (the reference uses 100).", rich_help_panel="Prompts"
        ),
    ] = 100,
    configs: Annotated[
        str,
        typer.Option(
            "--configs",
            metavar="<basic,basic_nosys,multiple_nosys,gcg>",
            help="Comma list of basic, basic_nosys, multiple_nosys, gcg [default: all].",
            rich_help_panel="Prompts",
        ),
    ] = "basic,basic_nosys,multiple_nosys,gcg",
    inst: Annotated[
        bool | None,
        typer.Option(
            "--inst/--no-inst",
            help="Only with (or without) instruction tags [default: both; GCG always with tags].",
            rich_help_panel="Prompts",
        ),
    ] = None,
    template: Annotated[
        Literal["chat", "llama2"] | None,
        typer.Option(
            "--template",
            help="llama2: the reference's [INST] <<SYS>> strings exactly; chat: the tokenizer's "
            "chat template [default: chat when the tokenizer has one].",
            rich_help_panel="Prompts",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", help="Tokens generated per response.", rich_help_panel="Generation"
        ),
    ] = 256,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="Sequences generated at once (hf backend): with --samples N a batch holds batch-size // N prompts.",
            rich_help_panel="Generation",
        ),
    ] = 16,
    samples: Annotated[
        int,
        typer.Option(
            "--samples", help="Samples per prompt in multiple_nosys.", rich_help_panel="Generation"
        ),
    ] = 5,
    backend: Annotated[
        Literal["hf", "vllm"],
        typer.Option(
            "--backend",
            help="hf: transformers; vllm: vLLM if installed.",
            rich_help_panel="Generation",
        ),
    ] = "hf",
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory-utilization",
            help="vllm: the share of GPU memory vLLM may take (its default: 0.9); lower it to leave room for an hf: judge.",
            rich_help_panel="Generation",
        ),
    ] = None,
    tensor_parallel_size: Annotated[
        int,
        typer.Option(
            "--tensor-parallel-size",
            help="vllm: GPUs one model is split across.",
            rich_help_panel="Generation",
        ),
    ] = 1,
    tmp_dir: Annotated[
        Path | None,
        typer.Option(
            "--tmp-dir",
            help="vllm: where the model under test is saved for vLLM [default: the --out directory].",
            rich_help_panel="Generation",
        ),
    ] = None,
    judge: Annotated[
        str,
        typer.Option(
            "--judge",
            metavar="<keyword|hf:MODEL>",
            help="keyword: the reference's refusal phrases; hf:MODEL: a HarmBench-style classifier LLM.",
        ),
    ] = "keyword",
    seed: SeedOption = 0,
    out_dir: OutOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    cache_dir: CacheDirOption = None,
    data_dir: DataDirOption = None,
    overwrite: OverwriteOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """How often does the model answer harmful prompts? Attack success rate in the reference's
    configurations, with every response kept as JSONL."""
    from wandacli.evaluation.attack import run_attack

    attack_config = AttackConfig(
        model=model_spec(ctx.params),
        mask=mask,
        store=store,
        prompts=prompts,
        prompt_column=prompt_column,
        limit=limit,
        configs=tuple(c.strip() for c in configs.split(",") if c.strip()),
        inst=(True, False) if inst is None else (inst,),
        template=template,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        backend=backend,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        tmp_dir=tmp_dir,
        judge=judge,
        samples=samples,
        seed=seed,
        out=out_dir,
        overwrite=overwrite,
        data_dir=data_dir,
    )
    with progress_reporter(enabled=not no_progress) as reporter:
        result = run_attack(attack_config, reporter=reporter)
    render.attack_result(result, as_json=json_output)


def eval_utility(
    ctx: typer.Context,
    model: ModelOption = DEFAULT_MODEL_ALIAS,
    mask: MaskOption = None,
    store: MaskStoreOption = None,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            metavar="<NAME|FILE>",
            help="Perplexity text: wikitext (WikiText-2 test) or a text file; 'none' to skip.",
        ),
    ] = "wikitext",
    seqlen: Annotated[
        int | None,
        typer.Option(
            "--seqlen",
            help="Window length [default: min(4096, model context), the reference's Llama-2 window].",
        ),
    ] = None,
    limit_windows: Annotated[
        int | None, typer.Option("--limit-windows", help="Only the first K windows (quick checks).")
    ] = None,
    zero_shot: Annotated[
        str | None,
        typer.Option(
            "--zero-shot",
            help="Comma list of lm-evaluation-harness tasks, or 'reference' for the reference's six "
            "(boolq, rte, hellaswag, winogrande, arc_challenge, openbookqa). Needs wandacli[eval].",
        ),
    ] = None,
    zero_shot_limit: Annotated[
        int, typer.Option("--zero-shot-limit", help="Examples per task (the reference's 200).")
    ] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Zero-shot batch size.")] = 1,
    kl: Annotated[
        bool,
        typer.Option(
            "--kl",
            help="The KL cost: mean KL(dense ‖ model) of the next-token distributions on harmless "
            "prompts over the first --kl-positions response positions (the dense side cached).",
            rich_help_panel="KL",
        ),
    ] = False,
    kl_prompts: KlPromptsOption = KL_PROMPTS,
    kl_limit: KlLimitOption = KL_LIMIT,
    kl_positions: KlPositionsOption = KL_POSITIONS,
    kl_cache: Annotated[
        Path | None,
        typer.Option(
            "--kl-cache",
            help="Where the dense model's distributions are cached [default: kl-dense/ beside the results folder].",
            rich_help_panel="KL",
        ),
    ] = None,
    template: Annotated[
        Literal["chat", "llama2"] | None,
        typer.Option(
            "--template",
            help="The KL prompts' template [default: chat when the tokenizer has one].",
            rich_help_panel="KL",
        ),
    ] = None,
    out_dir: OutOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    cache_dir: CacheDirOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """How much general ability is left? Perplexity (the reference's WikiText-2 computation),
    the KL divergence from the dense model (--kl) and zero-shot accuracy through
    lm-evaluation-harness."""
    from wandacli.core.reference import ZERO_SHOT_TASKS
    from wandacli.evaluation.utility import run_utility

    tasks: tuple[str, ...] = ()
    if zero_shot:
        tasks = (
            ZERO_SHOT_TASKS
            if zero_shot == "reference"
            else tuple(t.strip() for t in zero_shot.split(",") if t.strip())
        )
    utility_config = UtilityConfig(
        model=model_spec(ctx.params),
        mask=mask,
        store=store,
        data=None if data == "none" else data,
        seqlen=seqlen,
        limit_windows=limit_windows,
        zero_shot=tasks,
        zero_shot_limit=zero_shot_limit,
        batch_size=batch_size,
        out=out_dir,
        data_dir=data_dir,
        kl=kl,
        kl_prompts=kl_prompts,
        kl_limit=kl_limit,
        kl_positions=kl_positions,
        kl_cache=kl_cache,
        template=template,
    )
    with progress_reporter(enabled=not no_progress) as reporter:
        result = run_utility(utility_config, reporter=reporter)
    render.utility_result(result, as_json=json_output)
