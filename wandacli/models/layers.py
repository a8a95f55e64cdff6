"""The decoder's linear layers, found by architecture, as uniform (out, in) matrices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from wandacli.core.errors import ModelError
from wandacli.core.fingerprint import ModelFingerprint

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


def fingerprint_of(layers: list[LinearLayer]) -> ModelFingerprint:
    num_layers = 1 + max((lin.layer for lin in layers), default=-1)
    return ModelFingerprint(shapes={lin.key: lin.shape for lin in layers}, num_layers=num_layers)


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
