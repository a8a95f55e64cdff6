"""Reading a model from where `from_pretrained` finds it: device, dtype, device map, the
tokenizer, and the checks that every linear weight is in memory."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wandacli.config.settings import ModelSpec
from wandacli.core.console import info, quiet_hub_clients, warn
from wandacli.core.errors import ModelError, first_line
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.models.gguf import _quiet_transformers
from wandacli.models.layers import (
    LinearLayer,
    decoder_layers_path,
    fingerprint_of,
    iter_linear_layers,
    unmatched_matrices,
)
from wandacli.models.sources import (
    MODEL_FILE_ERRORS,
    ModelSource,
    dtype_name,
    parse_max_memory,
    resolve_device,
    resolve_dtype,
)


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
        return fingerprint_of(self.linear_layers, self.model)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the embedding's device (differs from `device` under device_map)."""
        embeddings = self.model.get_input_embeddings()
        return embeddings.weight.device if embeddings is not None else self.device

    @property
    def layers_path(self) -> str:
        """The decoder layers' module path, e.g. `model.layers` (Llama) or `transformer.h`."""
        return decoder_layers_path(self.model)


def end_of_sequence_ids(loaded: Any) -> list[int]:
    """The ids that end a response: the model's generation config's, else the tokenizer's."""
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, list) else [eos]


def weights_sample_digest(loaded: Any, rounded_to: torch.dtype | None = None) -> str:
    """sha256 of every 1009th value of each linear weight and of the embeddings: tells two
    checkpoints of one architecture apart (the fingerprint holds only names and shapes) in
    milliseconds, where hashing a 7B model whole would take half a minute. `rounded_to`: the
    values rounded to that dtype first (bfloat16: one checkpoint loaded in float32 or in
    bfloat16 gives one digest)."""
    digest = hashlib.sha256()
    # Each parameter once (the experts' matrices share their 3-D parameter).
    parameters = {lin.parameter_key: lin.weight for lin in loaded.linear_layers}
    weights = list(parameters.values())
    for module in (loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()):
        if module is not None and getattr(module, "weight", None) is not None:
            weights.append(module.weight)
    with torch.no_grad():
        for weight in weights:
            sample = weight.detach().reshape(-1)[::1009]
            sample = (sample.to(rounded_to) if rounded_to else sample).float().cpu().numpy()
            digest.update(sample.tobytes())
    return digest.hexdigest()


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
    except MODEL_FILE_ERRORS as exc:
        raise ModelError(f"cannot load the tokenizer of {model_arg!r}: {first_line(exc)}") from exc
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


def check_vocabulary_fits(tokenizer: Any, model: Any, model_arg: str) -> None:
    """Refuse a tokenizer whose ids reach past the embedding's rows (a tokenizer of another
    model, or added tokens without a resized embedding): generation would fail later with an
    index error. Fewer tokens than rows is normal (embeddings are padded to a round size)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(getattr(embeddings, "weight", None), "shape", (None,))[0]
    if rows is None:
        return
    size = len(tokenizer)
    if size > int(rows):
        raise ModelError(
            f"the tokenizer of {model_arg!r} has {size} tokens but the model's embedding has "
            f"{int(rows)} rows: use the tokenizer saved with this model, or resize the "
            "embedding (model.resize_token_embeddings) before saving it"
        )


def model_max_length(model: Any) -> int | None:
    """The longest context the model's config admits, when it says."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_pretrained(spec: ModelSpec, source: ModelSource, location: str) -> LoadedModel:
    """Model and tokenizer from a location `from_pretrained` reads (a hub id or a directory), in
    eval mode, on the chosen device and dtype, with every parameter frozen (code that needs
    gradients enables them where it needs them). The only `from_pretrained` of a model."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device, spec.auto_dtype)
    if spec.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        # Said where it changes the numbers from the float32 a CPU run would otherwise have
        # (every set and result records the dtype either way).
        info(f"--dtype auto: {dtype_name(dtype)} (this CPU multiplies bfloat16 natively)")
    if device.type == "cpu" and dtype == torch.float16:
        warn("float16 on CPU is slow and some kernels lack it; consider --dtype float32")
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
    except MODEL_FILE_ERRORS as exc:
        hint = (
            "check the hub id and your network or HF_TOKEN, or pass a local directory"
            if source.kind == "hub"
            else "check that the directory holds a causal language model"
        )
        raise ModelError(f"cannot load model {spec.model!r}: {first_line(exc)}; {hint}") from exc
    model.eval()
    model.requires_grad_(False)
    contiguous_head_input(model)
    dtype = model.dtype
    tokenizer = load_tokenizer(location, spec.model)
    check_vocabulary_fits(tokenizer, model, spec.model)
    layers = list(iter_linear_layers(model))
    if not layers:
        raise ModelError(f"model {spec.model!r} has no linear layers inside its decoder layers")
    for missing in unmatched_matrices(model):
        warn(f"{missing} is not a matrix wandacli knows: it is not scored, masked or edited")
    check_weights_resident(layers, spec)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        device=device,
        dtype=dtype,
        linear_layers=layers,
    )


def _fresh_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a new tensor of `shape` (row-major)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _contiguous(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # Not `is_contiguous()`: one row's slice [1, 1, d] counts as contiguous whatever the
    # stride of its size-1 dimensions, and that stride alone sends it down the slow path.
    if (
        args
        and isinstance(args[0], torch.Tensor)
        and args[0].stride() != _fresh_strides(args[0].shape)
    ):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def contiguous_head_input(model: Any) -> None:
    """Hand the output head its input laid out as a fresh tensor. transformers passes it the
    last positions as a strided slice (`hidden[:, -k:]`), and PyTorch's CPU matmul then takes a
    batched path that copies the [vocab, d] weight once per row before multiplying: in
    bfloat16, a batch of 125 prompts copied 7 GB and spent 13.6 s of a 27.6 s generation there
    (bench_generation); one row's slice took 57 ms where SmolLM2's head takes 3. The copy of the
    slice is [rows, k, d], negligible on every device."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(_contiguous)


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model can compute logits for chosen positions only (transformers ≥ 4.50)."""
    cls = type(model)
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return "logits_to_keep" in _FORWARD_PARAMETERS[cls]


def cache_keyword(model: Any) -> str:
    """The forward pass's name for a key/value cache: `cache` from transformers 5.2x,
    `past_key_values` before (and still accepted, with a deprecation warning, for a while)."""
    cls = type(model)
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return "cache" if "cache" in _FORWARD_PARAMETERS[cls] else "past_key_values"


def output_cache(output: Any) -> Any:
    """The key/value cache a forward pass returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
