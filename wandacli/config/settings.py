"""What every command's settings share: the model, the store, the calibration data's columns."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from wandacli.config.declare import internal, option
from wandacli.core import reference

DEFAULT_MODEL_ALIAS = "smollm2"
# The embedded model fine-tuned on the CPU to refuse harmful requests (wandacli/models/organism.py).
ALIGNED_MODEL_ALIAS = "smollm2-aligned"
DEFAULT_STORE = Path("wandacli-store")
# Per-weight scores (masks are made from them) and actsvd's rank statistics (rank edits).
WEIGHT_METHODS = ("wanda", "wandg", "magnitude", "random")
RANK_METHODS = ("actsvd",)
# Residual-stream means over prompts, for a refusal direction (Arditi et al. 2024).
ACTIVATION_METHODS = ("mean-activations",)
METHODS = WEIGHT_METHODS + RANK_METHODS + ACTIVATION_METHODS
DATA_METHODS = ("wanda", "wandg", "actsvd", "mean-activations")
# The last K prompt positions whose activations mean-activations averages: the reference's
# post-instruction tokens (Llama-2's ` [/INST]`, the chat templates' assistant cue).
MEAN_POSITIONS = 5

CALIBRATION_NSAMPLES = reference.CALIBRATION_NSAMPLES
CALIBRATION_SEED = reference.CALIBRATION_SEED
# The reference used the model's full context (4096 for Llama-2), a known cause of
# out-of-memory errors; calibration samples are rarely longer than a few hundred tokens.
DEFAULT_SEQLEN_CAP = 2048
# Wanda statistics are small (one vector per layer): checkpoint often. wandg accumulators are
# as large as the model's linear weights: checkpoint less often.
# actsvd's checkpoints hold d_in² float64 sums per distinct input (0.8 GB for SmolLM2): rarer.
# mean-activations' sums are [layers + 1, K, d_model] float64 (0.7 MB for SmolLM2): often.
DEFAULT_CHECKPOINT_EVERY = {"wanda": 8, "wandg": 32, "actsvd": 32, "mean-activations": 16}


# ---------------------------------------------------------------------------------------------
# Shared settings


# Filled in by the command line (cli/build.py), which may read data/'s catalogue of named sets.
NAMED_CALIBRATION_SETS = "{named calibration sets}"
NAMED_PROMPT_SETS = "{named prompt sets}"
DATA_DIR_HELP = "Folder holding the named sets' files [default: $WANDACLI_DATA_DIR, else the hub]."

MODEL_HELP = (
    "Hugging Face hub id, local model directory, .gguf file, 'smollm2' "
    "(the embedded SmolLM2-135M-Instruct), or 'smollm2-aligned' (it, fine-tuned once on the "
    "CPU to refuse harmful requests: the demo's model organism)."
)
MODEL_PANEL = "Model"
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# What `--dtype auto` means, one meaning per command, said in its --help.
AUTO_DTYPE_HELP = {
    "device": "Weights' dtype; auto = bfloat16 on CUDA and on a CPU that multiplies it "
    "natively (AVX-512 BF16, AMX), float32 on other CPUs.",
    "checkpoint": "Weights' dtype; auto = the checkpoint's own (a saved model keeps its size).",
}


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: `--model`, `--dtype`, `--device`, `--device-map`. Every command
    that loads a model embeds these options (`nested(ModelSpec)`); `auto_dtype` is the
    command's meaning of `--dtype auto`, resolved once by the loader (models/sources.py)."""

    model: str = option(DEFAULT_MODEL_ALIAS, "--model", "-m", help=MODEL_HELP, panel=MODEL_PANEL)
    dtype: str = option(
        "auto", "--dtype", help=AUTO_DTYPE_HELP["device"], panel=MODEL_PANEL, cli_type=Dtype
    )
    # `cuda:N` too, where code picks a rank's GPU; the command line offers the three.
    device: str = option(
        "auto",
        "--device",
        help="auto = cuda when available.",
        panel=MODEL_PANEL,
        cli_type=Literal["auto", "cpu", "cuda"],
    )
    device_map: str | None = option(
        None,
        "--device-map",
        metavar="<auto|balanced|sequential|JSON>",
        help="Shard the model across GPUs with accelerate: auto, balanced, sequential, or a JSON map.",
        panel=MODEL_PANEL,
    )
    max_memory: str | None = option(
        None,
        "--max-memory",
        help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
        panel=MODEL_PANEL,
    )
    cache_dir: Path | None = option(
        None,
        "--cache-dir",
        help="Where converted GGUF models are cached [default: $WANDACLI_CACHE_DIR or ~/.cache/wandacli].",
        panel=MODEL_PANEL,
    )
    auto_dtype: Literal["device", "checkpoint", "training"] = internal("device")

    def keeping_checkpoint_dtype(self) -> ModelSpec:
        """This spec with `--dtype auto` meaning the checkpoint's own dtype (a saved model
        keeps its size: a float16 7B model saved as float32 would double)."""
        return replace(self, auto_dtype="checkpoint")

    def for_training(self) -> ModelSpec:
        """This spec with `--dtype auto` meaning float32 on every device: AdamW's updates are
        smaller than bfloat16 resolves on most weights, and the attack keeps no float32 copy."""
        return replace(self, auto_dtype="training")


@dataclass(frozen=True)
class Columns:
    """Column names for local files (`--prompt-column`, `--response-column`, `--text-column`)."""

    prompt: str = "prompt"
    response: str = "response"
    text: str = "text"


# ---------------------------------------------------------------------------------------------
# Parsing the options that choose what is pruned


_NM = re.compile(r"^(\d+):(\d+)$")


def parse_nm(sparsity_type: str) -> tuple[int, int] | None:
    """(N, M) for 'N:M', None for 'unstructured'; ValueError otherwise."""
    if sparsity_type == "unstructured":
        return None
    match = _NM.match(sparsity_type)
    if not match:
        raise ValueError(f"--sparsity-type {sparsity_type!r}: use unstructured or N:M (e.g. 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"--sparsity-type {sparsity_type}: N must be at least 1 and less than M")
    return n, m


@dataclass(frozen=True)
class CommandOptions:
    """What every command has beside its settings: its config file, JSON output, progress."""

    config: Path | None = option(
        None,
        "--config",
        "-c",
        help="TOML file of option defaults; flags given on the command line win.",
        request=False,
    )
    json_output: bool = option(
        False, "--json", help="Print the result as JSON on stdout.", request=False
    )
    no_progress: bool = option(
        False,
        "--no-progress",
        help="Hide progress bars (logs stay on stderr).",
        request=False,
    )
