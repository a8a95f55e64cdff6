"""Shared command-line options, declared once as `Annotated` aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from wandacli.config.settings import ModelSpec

MODEL_HELP = (
    "Hugging Face hub id, local model directory, .gguf file, 'smollm2' "
    "(the embedded SmolLM2-135M-Instruct), or 'smollm2-aligned' (it, fine-tuned once on the "
    "CPU to refuse harmful requests: the demo's model organism)."
)

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help=MODEL_HELP, rich_help_panel="Model")
]
DtypeOption = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    typer.Option(
        "--dtype",
        help="Weights' dtype; auto = float32 on CPU, bfloat16 on CUDA.",
        rich_help_panel="Model",
    ),
]
DeviceOption = Annotated[
    Literal["auto", "cpu", "cuda"],
    typer.Option(
        "--device",
        help="auto = cuda when available.",
        rich_help_panel="Model",
    ),
]
DeviceMapOption = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        metavar="<auto|balanced|sequential|JSON>",
        help="Shard the model across GPUs with accelerate: auto, balanced, sequential, or a JSON map.",
        rich_help_panel="Model",
    ),
]
MaxMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
        rich_help_panel="Model",
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Where converted GGUF models are cached [default: $WANDACLI_CACHE_DIR or ~/.cache/wandacli].",
        rich_help_panel="Model",
    ),
]
StoreOption = Annotated[
    Path,
    typer.Option(
        "--store", "-s", help="Store directory (score sets and masks).", rich_help_panel="Store"
    ),
]
SeedOption = Annotated[
    int, typer.Option("--seed", help="Random seed (sample choice, random scores).")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML file of option defaults; flags given on the command line win.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing result of the same name.")
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder holding the named sets' files [default: $WANDACLI_DATA_DIR, else the hub].",
        rich_help_panel="Data",
    ),
]
NoProgressOption = Annotated[
    bool, typer.Option("--no-progress", help="Hide progress bars (logs stay on stderr).")
]


MaskOption = Annotated[
    str | None,
    typer.Option(
        "--mask",
        "--edit",
        help="A mask or a rank edit (name in --store, or path to its .h5) applied in memory: "
        "no pruned or edited copy on disk.",
        rich_help_panel="Model",
    ),
]
MaskStoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store", "-s", help="Store to look the mask name up in.", rich_help_panel="Model"
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Results directory [default: wandacli-results/<mask or model>]."
    ),
]


def model_spec(params: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of a command's resolved parameters (`ctx.params`: defaults < --config
    file < flags); options a command lacks take the loader's defaults."""
    return ModelSpec(
        model=params["model"],
        dtype=params.get("dtype", "auto"),
        device=params.get("device", "auto"),
        device_map=params.get("device_map"),
        max_memory=params.get("max_memory"),
        cache_dir=params.get("cache_dir"),
    )


# The KL cost, in eval-utility --kl and search.
KlPromptsOption = Annotated[
    str,
    typer.Option(
        "--kl-prompts",
        metavar="<NAME|FILE>",
        help="Harmless prompts for the KL cost [default: utility-held-out, the utility tasks the "
        "demo's organism was not tuned on].",
        rich_help_panel="KL",
    ),
]
KlLimitOption = Annotated[
    int, typer.Option("--kl-limit", help="Harmless prompts used.", rich_help_panel="KL")
]
KlPositionsOption = Annotated[
    int,
    typer.Option(
        "--kl-positions",
        help="Response positions the KL is averaged over (the first: the prompt's last position).",
        rich_help_panel="KL",
    ),
]
