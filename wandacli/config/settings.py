"""What every command's settings share: the model, the store, the calibration data's columns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: `--model`, `--dtype`, `--device`, `--device-map`."""

    model: str = DEFAULT_MODEL_ALIAS
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None  # "0=20GiB,1=20GiB,cpu=64GiB", with device_map
    cache_dir: Path | None = None


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
