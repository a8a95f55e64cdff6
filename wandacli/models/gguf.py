"""GGUF files converted once to safetensors in the cache."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from wandacli.core.console import info
from wandacli.core.durable import save_model_directory
from wandacli.core.errors import ModelError, first_line
from wandacli.core.paths import cache_root
from wandacli.models.sources import MODEL_FILE_ERRORS


def converted_gguf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cache directory for one GGUF file, keyed by its path, size and modification time."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "models" / f"{gguf_path.stem}-{digest}"


_COMPLETE_MARKER = ".wandacli-complete"


def ensure_converted_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Convert a GGUF to a safetensors model directory once; later calls return the cache."""
    target = converted_gguf_dir(gguf_path, cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    from filelock import FileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache {target.parent}: {exc.strerror}; "
            "set WANDACLI_CACHE_DIR to a writable directory"
        ) from exc
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE_MARKER).is_file():  # another process converted it meanwhile
            return target
        _convert_gguf(gguf_path, target)
    return target


@contextlib.contextmanager
def _silenced_gguf_progress() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own that ignores its progress-bar
    switch; our log line replaces it. Best effort: a missing private name changes nothing."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        original = gguf_utils.tqdm
    except (ImportError, AttributeError):
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


# What the gguf package raises on a damaged header or index, besides a model file's errors.
_HEADER_ERRORS: tuple[type[Exception], ...] = (*MODEL_FILE_ERRORS, IndexError, TypeError)


def check_gguf_header(gguf_path: Path) -> None:
    """Refuse, before announcing a conversion, a file that is not a readable GGUF: the magic
    bytes, then its header and tensor index as the gguf package reads them (a truncated
    download fails here, in a second, not half a minute into the conversion)."""
    try:
        with gguf_path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read GGUF file {gguf_path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise ModelError(
            f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes): "
            "pass a .gguf model, a model directory or a hub id"
        )
    try:
        from gguf import GGUFReader

        GGUFReader(str(gguf_path))
    except ImportError:
        return  # the conversion says what to install
    except _HEADER_ERRORS as exc:
        raise ModelError(
            f"{gguf_path} is a damaged or truncated GGUF file ({first_line(exc)}): download it again"
        ) from exc


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_header(gguf_path)
    info(f"converting {gguf_path.name} to safetensors once (about 30 s); cached in {target}")
    started = time.monotonic()
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        with _silenced_gguf_progress():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
    except ImportError as exc:
        raise ModelError(
            f"reading GGUF files needs the gguf package: pip install gguf ({exc})"
        ) from exc
    except MODEL_FILE_ERRORS as exc:
        raise ModelError(f"cannot read GGUF file {gguf_path}: {first_line(exc)}") from exc
    # The tensors are already de-quantized to float32; these markers only make transformers
    # refuse save_pretrained ("quantized model cannot be saved").
    setattr(model, "hf_quantizer", None)  # noqa: B010 (a typed attribute we must clear)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_cached_model(
        model,
        tokenizer,
        target,
        "converted model",
        lambda tmp: (tmp / _COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)})),
    )
    info(f"converted in {time.monotonic() - started:.0f} s")


def _quiet_transformers() -> None:
    """Our own progress and messages replace transformers' bars and advisory warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def save_cached_model(
    model: Any, tokenizer: Any, target: Path, what: str, add_files: Callable[[Path], Any]
) -> None:
    """A model made once into the cache (a converted GGUF, the aligned organism), saved
    atomically; a cache that cannot be written says how to choose another."""
    try:
        save_model_directory(model, tokenizer, target, add_files)
    except OSError as exc:
        raise ModelError(
            f"cannot write the {what} to {target}: {exc.strerror}; "
            "set WANDACLI_CACHE_DIR to a writable directory with ~1 GB free"
        ) from exc
